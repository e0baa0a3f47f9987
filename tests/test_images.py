"""data/images.py: scanning an image folder, bad and odd files, the decode cache, names DALI cannot read."""

import os

import numpy as np
import pytest
from conftest import needs_dali
from PIL import Image

from collab_fast.data import DaliLoader, DataConfig, build_loaders, scan_split, write_toy


def _folder(tmp_path, layout):
    """layout: {split: {class: [(name, kind)]}} with kind in jpeg, png, gray, cmyk, trunc, junk."""
    rng = np.random.default_rng(0)
    for split, classes in layout.items():
        for c, items in classes.items():
            d = tmp_path / split / c
            d.mkdir(parents=True, exist_ok=True)
            for name, kind in items:
                rgb = Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8))
                if kind == "jpeg":
                    rgb.save(d / name, format="JPEG")
                elif kind == "png":
                    rgb.save(d / name, format="PNG")
                elif kind == "gray":
                    rgb.convert("L").save(d / name, format="JPEG")
                elif kind == "cmyk":
                    rgb.convert("CMYK").save(d / name, format="JPEG")
                elif kind == "trunc":
                    rgb.save(d / name, format="JPEG")
                    (d / name).write_bytes((d / name).read_bytes()[:200])
                elif kind == "junk":
                    (d / name).write_bytes(b"hello, not an image")
    return tmp_path


def test_scan_classes_from_train(toy):
    files, labels, classes = scan_split(toy, "train")
    assert classes == ["class_000", "class_001", "class_002"] and len(files) == 21
    assert sorted(set(labels)) == [0, 1, 2]
    vfiles, vlabels, _ = scan_split(toy, "val", classes=classes)
    assert len(vfiles) == 9 and all(f.split("/")[-2] == classes[y] for f, y in zip(vfiles, vlabels))


def test_val_uses_train_class_indices(tmp_path):
    root = _folder(tmp_path, {"train": {"a": [("1.JPEG", "jpeg")], "b": [("1.JPEG", "jpeg")], "c": [("1.JPEG", "jpeg")]},
                              "val": {"c": [("1.JPEG", "jpeg")]}})
    _, _, classes = scan_split(root, "train")
    _, vlabels, _ = scan_split(root, "val", classes=classes)
    assert vlabels == [2]  # 'c' keeps its train index, not 0


@pytest.mark.parametrize("layout, match", [
    ({"train": {"a": [("1.JPEG", "jpeg")]}, "val": {"z": [("1.JPEG", "jpeg")]}}, "the train split does not have"),
    ({"train": {"a": []}}, "has no images"),
    ({"train": {}}, "no class folders"),
    ({"train": {"a": [("1.JPEG", "trunc")]}}, r"1.JPEG: truncated JPEG"),
    ({"train": {"a": [("1.JPEG", "junk")]}}, r"1.JPEG: not a JPEG or PNG"),
])
def test_bad_folders(tmp_path, layout, match):
    root = _folder(tmp_path, layout)
    if layout["train"] == {}:
        (root / "train").mkdir(exist_ok=True)
    with pytest.raises(ValueError, match=match):
        _, _, classes = scan_split(root, "train")
        scan_split(root, "val", classes=classes)


def test_missing_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        scan_split(tmp_path / "nope", "train")
    with pytest.raises(FileNotFoundError, match="ImageNet layout"):
        scan_split(tmp_path, "train")


def test_skip_bad_files_with_a_counted_warning(tmp_path):
    root = _folder(tmp_path, {"train": {"a": [("1.JPEG", "jpeg"), ("2.JPEG", "trunc"), ("3.JPEG", "junk")]}})
    with pytest.warns(RuntimeWarning, match="skipping 2 unreadable image file"):
        files, _, _ = scan_split(root, "train", skip_bad=True)
    assert [f.split("/")[-1] for f in files] == ["1.JPEG"]


def _forge(path, kind):
    """A JPEG whose markers pass the header check but which no decoder can take."""
    import struct

    data = bytearray(path.read_bytes())
    if kind == "huge":  # SOF0 claims 65500 x 65500 pixels
        i = data.find(b"\xff\xc0")
        data[i + 5 : i + 9] = struct.pack(">HH", 65500, 65500)
    else:  # garbage from the tables on, end marker kept
        for j in range(30, len(data) - 2):
            data[j] = (j * 7) & 0xFF
    path.write_bytes(bytes(data))


@needs_dali
def test_bad_image_without_skip_is_one_line_naming_the_folder(tmp_path):
    from collab_fast.data import DataError

    root = write_toy(tmp_path / "t", classes=2, per_class=4, size=32, val_per_class=1)
    _forge(sorted((root / "train").rglob("*.JPEG"))[0], "huge")
    train, _, _ = build_loaders(DataConfig("toy", root=str(root), image_size=24), batch_size=4)
    with pytest.raises(DataError) as info:
        for _ in train:
            pass
    msg = str(info.value)
    assert "\n" not in msg and str(root / "train") in msg and "--skip-bad-images" in msg and "check" in msg


@needs_dali
def test_skip_bad_images_decodes_every_file_once(tmp_path, monkeypatch):
    import collab_fast.data.images as images

    monkeypatch.setenv("COLLAB_FAST_CACHE", str(tmp_path / "cache"))
    root = write_toy(tmp_path / "t", classes=2, per_class=4, size=32, val_per_class=1)
    files = sorted((root / "train").rglob("*.JPEG"))
    _forge(files[0], "huge")
    _forge(files[5], "garbage")
    with pytest.warns(RuntimeWarning, match="skipping 2 unreadable image file"):
        train, _, _ = build_loaders(DataConfig("toy", root=str(root), image_size=24, skip_bad_images=True), batch_size=2)
    assert sum(x.shape[0] for x, _ in train) == 6  # the 6 good training images, no DALI failure
    del train  # its pipeline prefetches the next epoch: no files rewritten under it
    decoded = []
    monkeypatch.setattr(images, "decode_image", lambda p: decoded.append(p))
    with pytest.warns(RuntimeWarning, match="skipping 2"):  # the verdicts come from the cache
        scan_split(root, "train", skip_bad=True, decode=True)
    assert decoded == []
    files[1].write_bytes(files[1].read_bytes() + b"\x00")  # a changed file is decoded again
    with pytest.warns(RuntimeWarning):
        scan_split(root, "train", skip_bad=True, decode=True)
    assert decoded == [files[1]]


@pytest.mark.parametrize("damage", ['[1, 2, 3]', '{"x": 1}', '{"%s": [1]}', '{"%s": ["0:0", 7]}', "{{{", ""])
def test_a_damaged_decode_cache_is_rebuilt(tmp_path, monkeypatch, damage):
    import collab_fast.data.images as images

    monkeypatch.setenv("COLLAB_FAST_CACHE", str(tmp_path / "cache"))
    root = write_toy(tmp_path / "t", classes=2, per_class=3, size=32, val_per_class=1)
    files = sorted((root / "train").rglob("*.JPEG"))
    scan_split(root, "train", decode=True)
    cache = images._decode_cache(root / "train")
    cache.write_text(damage.replace("%s", str(files[0])) if "%s" in damage else damage)
    got, _, _ = scan_split(root, "train", decode=True)
    assert got == [str(f) for f in files]
    assert set(__import__("json").loads(cache.read_text())) == {str(f) for f in files}


def _non_utf8_folder(tmp_path):
    # A class folder and a file named in Latin-1 (not UTF-8): Python keeps the bytes as surrogates.
    root = write_toy(tmp_path / "t", classes=2, per_class=3, size=32, val_per_class=1)
    base = os.fsencode(root / "train")
    os.rename(os.path.join(base, b"class_000"), os.path.join(base, b"caf\xe9"))
    one = sorted(os.listdir(os.path.join(base, b"class_001")))[0]
    os.rename(os.path.join(base, b"class_001", one), os.path.join(base, b"class_001", b"\xff" + one))
    vbase = os.fsencode(root / "val")
    os.rename(os.path.join(vbase, b"class_000"), os.path.join(vbase, b"caf\xe9"))
    return root


@needs_dali
def test_non_utf8_names_are_one_line_for_dali_and_fine_for_the_torch_loader(tmp_path):
    root = _non_utf8_folder(tmp_path)
    with pytest.raises(ValueError) as info:  # DALI's reader takes only UTF-8 paths (a RuntimeError traceback)
        build_loaders(DataConfig("toy", root=str(root), image_size=24, loader="dali"), batch_size=2)
    msg = str(info.value)
    assert "\n" not in msg and "4 unreadable image file(s)" in msg and "not valid UTF-8" in msg
    assert "caf\\udce9" in msg and "--loader torch" in msg
    msg.encode("utf-8")  # printable as it is
    with pytest.warns(RuntimeWarning, match="skipping 4 unreadable"):
        scan_split(root, "train", utf8_names=True, skip_bad=True)
    from collab_fast.data import TorchFolderLoader

    files, labels, classes = scan_split(root, "train")  # the PyTorch loader reads them (no workers: this
    # process ran DALI pipelines, whose threads a forked worker must not inherit)
    train = TorchFolderLoader(files, labels, 2, train=True, num_classes=2, image_size=24, threads=0)
    assert len(classes) == 2 and sum(x.shape[0] for x, _ in train) == 6
    with pytest.raises(ValueError, match="cannot be read by DALI, e.g. .*caf"):
        files, labels, _ = scan_split(root, "train")
        DaliLoader(files, labels, 2, train=True, num_classes=2, image_size=24)
