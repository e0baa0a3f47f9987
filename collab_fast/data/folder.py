"""ImageNet-format folders (DIR/train/<class>/*.JPEG, DIR/val/<class>/*.JPEG) through NVIDIA DALI.

Train: file reader (shuffled, sharded by rank / world size, padded last batch) -> JPEG decoding fused with
the random resized crop (ROI decode; "mixed" device = nvJPEG / the hardware decoder on a GPU) -> resize ->
random horizontal flip + normalisation -> output already on the device, in the trainer's dtype, in NHWC
memory (channels_last) or NCHW. Val: decode -> resize the shorter side -> centre crop -> normalise.

The same pipeline runs with CPU operators when device_id is None (what CI tests): the device is a
parameter, not a second implementation. The reader emits each sample's index; the loader maps it to the
epoch's label on the device, which is how label noise is redrawn every epoch without rebuilding anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from collab_fast.cache import cache_root
from collab_fast.data.noise import LabelNoise
from collab_fast.extras import require
from collab_fast.seeding import torch_generator

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "DataError", "DaliLoader", "check_image", "decode_image", "scan_split"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")


def dali_installed() -> bool:
    """Whether NVIDIA DALI can be imported (image folders then default to it)."""
    import importlib.util

    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except (ImportError, ValueError):
        return False


def _dali_wheels() -> list[str]:
    from importlib import metadata

    return sorted({d.metadata["Name"].lower() for d in metadata.distributions()
                   if (d.metadata["Name"] or "").lower().startswith("nvidia-dali-cuda")})


def _driver_cuda() -> tuple[int, int] | None:
    """The CUDA version the installed driver supports (e.g. (12, 4)), or None where there is no driver. Asked
    of the driver library itself (cuDriverGetVersion): torch has no public call for it, and the private one
    that some builds have is missing from others (torch 2.11's CUDA 13 wheel, seen on an H200)."""
    import ctypes

    try:
        lib = ctypes.CDLL("libcuda.so.1")
        v = ctypes.c_int(0)
        if lib.cuDriverGetVersion(ctypes.byref(v)) != 0:
            return None
    except (OSError, AttributeError):
        return None
    return (v.value // 1000, v.value % 1000 // 10) if v.value > 0 else None


def check_dali_wheel(device: torch.device) -> None:
    """One line naming the right extra when the installed DALI wheel needs a newer CUDA driver than this
    machine has (DALI would otherwise fail at pipeline build with a traceback)."""
    if device.type != "cuda":
        return
    driver = _driver_cuda()
    for name in _dali_wheels():
        digits = name[len("nvidia-dali-cuda"):]
        if not digits.isdigit() or driver is None:
            continue
        need = int(digits) // 10
        if need > driver[0]:
            raise ValueError(f"{name} needs a CUDA {need} driver, but this machine's driver supports CUDA "
                             f"{driver[0]}.{driver[1]}: pip uninstall {name} && pip install "
                             f"'collab_fast[dali-cuda{driver[0]}]' (or --loader torch, no DALI)")


def _dali():
    require("nvidia.dali", "dali", "--loader dali", hint="or 'collab_fast[dali-cuda12]' for a CUDA 12 driver; "
            "--loader torch reads image folders without DALI")
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    return fn, types, pipeline_def, DALIGenericIterator, LastBatchPolicy


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
    with ThreadPoolExecutor(threads or min(32, os.cpu_count() or 1)) as pool:
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


def _shown(p) -> str:
    """A path for a message: bytes that are not UTF-8 (kept by Python as surrogates) shown as escapes."""
    return str(p).encode("utf-8", "backslashreplace").decode("utf-8")


def _utf8(p: Path) -> bool:
    try:
        str(p).encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


_NOT_UTF8 = "its path is not valid UTF-8, which DALI cannot read (rename it, or use --loader torch)"


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
    found = sorted(d.name for d in base.iterdir() if d.is_dir())
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
        verdict.update({p: _NOT_UTF8 for p, _ in entries if not _utf8(p)})
    files, labels, bad = [], [], []
    for p, label in entries:
        if verdict[p]:
            bad.append((p, verdict[p]))
        else:
            files.append(str(p))
            labels.append(label)
    if bad:
        listing = "; ".join(f"{_shown(p)}: {why}" for p, why in bad[:5]) + (" ..." if len(bad) > 5 else "")
        if not skip_bad:
            raise ValueError(f"{len(bad)} unreadable image file(s) in {base}: {listing} "
                             "(remove them, or pass skip_bad / --skip-bad-images to skip them)")
        warnings.warn(f"skipping {len(bad)} unreadable image file(s) in {base}: {listing}", RuntimeWarning,
                      stacklevel=2)
    if not files:
        raise ValueError(f"{base} has no readable images")
    return files, labels, classes


def _pipeline(files, batch_size, *, train, device_id, image_size, crop_ratio, rank, world, seed, num_threads, dtype,
              channels_last, mean, std, augment):
    """The DALI pipeline definition (call it, optionally with checkpoint=..., to get a pipeline): reader ->
    decode (+ random resized crop when training) -> resize -> flip + normalise; outputs (images, index)."""
    fn, types, pipeline_def, _, _ = _dali()
    gpu = device_id is not None
    decode_device, op_device = ("mixed", "gpu") if gpu else ("cpu", "cpu")
    out_type = types.FLOAT16 if dtype == torch.float16 else types.FLOAT
    threads = num_threads or max(1, min(8, os.cpu_count() or 1))

    # Checkpointing (training only) records the reader's position and every random generator, so a run
    # resumed mid-epoch or at a later epoch sees the order and augmentations the uninterrupted run saw.
    @pipeline_def(batch_size=batch_size, num_threads=threads, device_id=device_id, seed=(seed + 17 * rank) % (1 << 63),
                  prefetch_queue_depth=2, enable_checkpointing=train)
    def pipeline():
        # Plain reads, not mmap: a file truncated or rewritten under a running job must give a decode error,
        # not SIGBUS (a mapped page past the new end kills the process with no checkpoint written).
        jpegs, index = fn.readers.file(files=files, labels=list(range(len(files))), shuffle_after_epoch=train,
                                       shard_id=rank, num_shards=world, pad_last_batch=True, name="Reader",
                                       seed=seed % (1 << 63), dont_use_mmap=True)
        if train and augment != "none":
            images = fn.decoders.image_random_crop(jpegs, device=decode_device, output_type=types.RGB,
                                                   random_area=[0.08, 1.0], random_aspect_ratio=[0.75, 4 / 3],
                                                   num_attempts=10)
            images = fn.resize(images, device=op_device, resize_x=image_size, resize_y=image_size)
            mirror = fn.random.coin_flip(probability=0.5) if augment == "crop+flip" else 0
        else:
            images = fn.decoders.image(jpegs, device=decode_device, output_type=types.RGB)
            images = fn.resize(images, device=op_device, resize_shorter=round(image_size / crop_ratio))
            mirror = 0
        images = fn.crop_mirror_normalize(images, device=op_device, dtype=out_type,
                                          output_layout="HWC" if channels_last else "CHW",
                                          crop=(image_size, image_size), crop_pos_x=0.5, crop_pos_y=0.5,
                                          mean=[255 * m for m in mean], std=[255 * s for s in std], mirror=mirror)
        return images, index.gpu() if gpu else index

    return pipeline


class DaliLoader:
    """(images, labels) batches of an image folder split through a DALI pipeline.

    Args:
        files, labels: from scan_split. train: random resized crop + flip (augment "crop+flip"; "crop": no
            flip; "none": resize + centre crop as in evaluation); else resize + centre crop.
        device_id: CUDA device for the mixed/GPU operators, or None for the CPU pipeline.
        image_size: output side; val resizes the shorter side to round(image_size / crop_ratio) first.
        rank, world: sharding; every sample is read exactly once per epoch across the ranks.
        drop_last: drop each shard's short last batch (training), else return it (evaluation).
    """

    def __init__(self, files: list[str], labels: list[int], batch_size: int, *, train: bool, num_classes: int,
                 device_id: int | None = None, image_size: int = 224, crop_ratio: float = 0.875,
                 rank: int = 0, world: int = 1, seed: int = 0, num_threads: int | None = None,
                 drop_last: bool | None = None, label_noise: float = 0.0, dtype: torch.dtype = torch.float32,
                 channels_last: bool = True, mean=IMAGENET_MEAN, std=IMAGENET_STD, augment: str = "crop+flip"):
        if len(files) != len(labels) or not files:
            raise ValueError(f"need as many labels as files (got {len(files)} files, {len(labels)} labels)")
        if dtype not in (torch.float32, torch.float16):
            raise ValueError(f"DALI outputs float32 or float16, got {dtype}")
        not_utf8 = [f for f in files if not _utf8(Path(f))]
        if not_utf8:
            raise DataError(f"{len(not_utf8)} file(s) cannot be read by DALI, e.g. {_shown(not_utf8[0])}: {_NOT_UTF8}, "
                            "or pass --skip-bad-images to skip them")
        self.device = torch.device("cpu" if device_id is None else f"cuda:{device_id}")
        if train:
            # A full seeded shuffle first (image folders are sorted by class), then DALI reshuffles the
            # whole list after every epoch, identically on every rank: shards stay disjoint and complete.
            perm = torch.randperm(len(files), generator=torch_generator(seed)).tolist()
            files, labels = [files[i] for i in perm], [labels[i] for i in perm]
        self.train = train
        self.root = os.path.commonpath(files) if len(files) > 1 else os.path.dirname(files[0])
        self.batch_size = batch_size
        self.num_classes = num_classes
        self.drop_last = train if drop_last is None else drop_last
        self.noise = LabelNoise(torch.tensor(labels), label_noise, num_classes, seed) if train and label_noise > 0 else None
        self.table = torch.tensor(labels, dtype=torch.int64, device=self.device)  # sample index -> label
        self.channels_last = channels_last
        n = len(files)
        self.num_samples = n * (rank + 1) // world - n * rank // world  # DALI's contiguous shard of the list
        self._make_pipeline = _pipeline(files, batch_size, train=train, device_id=device_id, image_size=image_size,
                                        crop_ratio=crop_ratio, rank=rank, world=world, seed=seed,
                                        num_threads=num_threads, dtype=dtype, channels_last=channels_last,
                                        mean=mean, std=std, augment=augment)
        _, _, _, iterator_cls, policy = _dali()
        self._make_iter = lambda pipe: iterator_cls(
            [pipe], ["images", "index"], reader_name="Reader", auto_reset=True,
            last_batch_policy=policy.DROP if self.drop_last else policy.PARTIAL)
        self._build(None)

    def _build(self, checkpoint: str | None) -> None:
        self._pipe = self._make_pipeline(checkpoint=checkpoint) if checkpoint else self._make_pipeline()
        self._pipe.build()
        self._iter = self._make_iter(self._pipe)
        self._len = len(self._iter)
        self._resumed_at = 0  # the epoch's batch at which the rebuilt reader starts
        self._position = 0  # batches of the current epoch consumed

    def __len__(self) -> int:
        return self._len

    def state_dict(self) -> dict:
        """The reader's position and random states after the batches consumed so far, and how many batches
        of the epoch that is (training loaders); {} for evaluation loaders, which always start from their
        first batch."""
        if not self.train:
            return {}
        return {"reader": self._iter.checkpoints()[0], "batch_in_epoch": self._position % max(self._len, 1)}

    def load_state_dict(self, state: dict) -> None:
        """Continues where `state` was taken (see state_dict)."""
        if state.get("reader") and self.train:
            try:
                self._build(state["reader"])
            except RuntimeError as exc:
                raise ValueError(f"the data loader state in the checkpoint does not fit this data set or DALI "
                                 f"version ({str(exc).splitlines()[0]}); resume with the same --data and "
                                 "--batch-size") from None
            self._resumed_at = int(state.get("batch_in_epoch", 0))

    def set_epoch(self, epoch: int) -> None:
        # The reader reshuffles by itself after each epoch; only the noisy labels change here.
        if self.noise is not None:
            self.table = self.noise.labels_for_epoch(epoch).to(self.device)

    def __iter__(self):
        return self.iter_from(0)

    def iter_from(self, start: int):
        """This epoch's batches from batch `start` on: free after load_state_dict at that batch; otherwise
        the first `start` batches are read and dropped (a checkpoint without loader state)."""
        resumed, self._resumed_at = self._resumed_at, 0
        self._position = resumed
        for i, batch in enumerate(self._batches()):
            self._position = resumed + i + 1  # batches of this epoch consumed once this one is
            if i >= start - resumed:
                yield batch

    def _batches(self):
        try:
            for out in self._iter:
                x = out[0]["images"]
                idx = out[0]["index"].view(-1).long()
                if self.channels_last:
                    x = x.permute(0, 3, 1, 2)  # NHWC memory seen as NCHW: channels_last, no copy
                yield x, self.table[idx]
        except RuntimeError as exc:
            if "Critical error in pipeline" not in str(exc):
                raise
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
            why = next((ln for ln in lines if "failure" in ln or "rror:" in ln), lines[-1])
            raise DataError(f"DALI could not decode an image under {self.root} ({why}); find it with `python -m "
                            f"collab_fast.data check {self.root} --decode`, or pass --skip-bad-images (every "
                            "image decoded once before training, bad ones named and skipped)") from None
