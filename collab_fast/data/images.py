"""Image folders in the ImageNet layout (DIR/train/<class>/*.JPEG, DIR/val/<class>/*.JPEG), whichever
loader reads them (DALI: data/dali.py; PyTorch: data/torch_folder.py): scanning a split into files and
labels, the cheap header check and the full decode check of each file (the verdicts cached per file), the
one-line errors, and the ImageNet statistics the pipelines normalise with."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from collab_fast.cache import cache_root
from collab_fast.data.loader import default_threads
from collab_fast.extras import require

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_EXTENSIONS", "NOT_UTF8", "DataError", "check_image", "class_folders",
           "decode_image", "is_utf8", "scan_split", "shown"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")


def check_image(path: str | Path) -> str | None:
    """Cheap header/trailer check. Returns why the file cannot be an image, or None if it looks fine.

    JPEG: starts with FF D8 FF and ends with the FF D9 marker (a truncated file does not); PNG: the 8-byte
    signature. The decoder reads the content, not the extension, so a PNG named .JPEG is fine.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if head[:3] == b"\xff\xd8\xff":
                f.seek(max(size - 64, 0))
                tail = f.read()
                return None if b"\xff\xd9" in tail else "truncated JPEG (no end-of-image marker)"
            if head == b"\x89PNG\r\n\x1a\n":
                return None
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    return "not a JPEG or PNG file" if size else "empty file"


class DataError(ValueError):
    """A data set that cannot be read as asked (reported in one line)."""


def decode_image(path: str | Path) -> str | None:
    """Full check: the header check, then a complete decode with Pillow, whose pixel limit (about 179M
    pixels) also refuses forged headers such as 65500x65500. Returns why the file is bad, or None."""
    why = check_image(path)
    if why:
        return why
    Image = require("PIL.Image", "train", "checking images by decoding them")
    try:
        with Image.open(path) as im:
            im.convert("RGB").load()
    except Exception as exc:  # Pillow raises many types for broken files
        return f"does not decode ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})"
    return None


def _decode_cache(base: Path) -> Path:
    key = hashlib.blake2b(os.fsencode(base.resolve()), digest_size=8).hexdigest()
    return cache_root() / "decode_checks" / f"{base.name}-{key}.json"


def _decode_all(base: Path, paths: list[Path], threads: int | None) -> dict[Path, str | None]:
    """decode_image of every path, in parallel (Pillow decodes without the GIL); results are cached by
    (path, size, mtime), so a later run decodes only new or changed files."""
    cache_file = _decode_cache(base)
    try:
        cached = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cached = {}
    if not isinstance(cached, dict):  # a damaged cache (another program's file, a bad copy): start over
        cached = {}
    # Entries of another shape are dropped: those files are simply checked again.
    cached = {k: v for k, v in cached.items() if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str)
              and (v[1] is None or isinstance(v[1], str))}
    stamps = {}
    for p in paths:
        st = p.stat()
        stamps[p] = f"{st.st_size}:{st.st_mtime_ns}"
    todo = [p for p in paths if cached.get(str(p), [None])[0] != stamps[p]]
    with ThreadPoolExecutor(threads or default_threads()) as pool:
        for p, why in zip(todo, pool.map(decode_image, todo)):
            cached[str(p)] = [stamps[p], why]
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cached))
        os.replace(tmp, cache_file)
    except OSError:
        pass  # a read-only cache only costs the next run another check
    return {p: cached[str(p)][1] for p in paths}


def shown(p) -> str:
    """A path for a message: bytes that are not UTF-8 (kept by Python as surrogates) shown as escapes."""
    return str(p).encode("utf-8", "backslashreplace").decode("utf-8")


def is_utf8(p: Path) -> bool:
    try:
        str(p).encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


NOT_UTF8 = "its path is not valid UTF-8, which DALI cannot read (rename it, or use --loader torch)"


def class_folders(base: Path) -> list[str]:
    """The class folders of a split (base = root/split), sorted: their order gives the label indices."""
    return sorted(d.name for d in base.iterdir() if d.is_dir())


def scan_split(root: str | Path, split: str, classes: list[str] | None = None, check_files: bool = True,
               skip_bad: bool = False, decode: bool = False, threads: int | None = None,
               utf8_names: bool = False) -> tuple[list[str], list[int], list[str]]:
    """Files and labels of root/split. Class indices come from `classes` (the sorted train folders).

    check_files: the cheap header check of every file; decode: a full decode of every file (cached), which
    finds what the header check cannot; skip_bad: skip (and name) bad files instead of failing; utf8_names:
    a path that is not valid UTF-8 (a file or class folder named in another encoding) is a bad file (DALI
    takes only UTF-8 paths)."""
    base = Path(root) / split
    if not Path(root).is_dir():
        raise FileNotFoundError(f"data directory {root} does not exist")
    if not base.is_dir():
        raise FileNotFoundError(f"{base} does not exist: expected {root}/{split}/<class>/<image> (ImageNet layout)")
    found = class_folders(base)
    if not found:
        raise ValueError(f"{base} has no class folders (expected {base}/<class>/<image>)")
    if classes is None:
        classes = found
    else:
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise ValueError(f"{base} has class folders that the train split does not have: {unknown[:5]}"
                             f"{' ...' if len(unknown) > 5 else ''} (their labels would be wrong)")
    index = {c: i for i, c in enumerate(classes)}
    entries = []
    for c in found:
        these = sorted(p for p in (base / c).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not these:
            raise ValueError(f"class folder {base / c} has no images (.JPEG/.jpg/.png)")
        entries += [(p, index[c]) for p in these]
    if decode:
        verdict = _decode_all(base, [p for p, _ in entries], threads)
    else:
        verdict = {p: check_image(p) if check_files else None for p, _ in entries}
    if utf8_names:
        verdict.update({p: NOT_UTF8 for p, _ in entries if not is_utf8(p)})
    files, labels, bad = [], [], []
    for p, label in entries:
        if verdict[p]:
            bad.append((p, verdict[p]))
        else:
            files.append(str(p))
            labels.append(label)
    if bad:
        listing = "; ".join(f"{shown(p)}: {why}" for p, why in bad[:5]) + (" ..." if len(bad) > 5 else "")
        if not skip_bad:
            raise ValueError(f"{len(bad)} unreadable image file(s) in {base}: {listing} "
                             "(remove them, or pass skip_bad / --skip-bad-images to skip them)")
        warnings.warn(f"skipping {len(bad)} unreadable image file(s) in {base}: {listing}", RuntimeWarning,
                      stacklevel=2)
    if not files:
        raise ValueError(f"{base} has no readable images")
    return files, labels, classes
