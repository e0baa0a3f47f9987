"""data/memory.py: the device-resident sets (digits, CIFAR pickles, synthetic) and their loader."""

import os
import pickle

import numpy as np
import pytest
import torch

from collab_fast.data import DataConfig, DeviceLoader, SyntheticLoader, build_loaders
from collab_fast.data.memory import load_cifar, load_digits


def test_digits_split_and_stats():
    (x, y), (xt, yt) = load_digits()
    assert x.shape == (1437, 32, 32, 3) and xt.shape == (360, 32, 32, 3) and x.dtype == torch.uint8
    assert sorted(set(y.tolist())) == list(range(10))
    train, val, classes = build_loaders(DataConfig("digits"), batch_size=100)
    assert classes == 10 and len(train) == 14 and len(val) == 4
    xb, yb = next(iter(val))
    assert xb.shape == (100, 3, 32, 32) and xb.is_contiguous(memory_format=torch.channels_last)
    assert abs(xb.mean().item()) < 0.3 and 0.7 < xb.std().item() < 1.3


def test_augmentation_suits_the_data_set():
    from collab_fast.data import default_augment

    assert default_augment("digits") == "crop" and default_augment("cifar10") == "crop+flip"
    train, _, _ = build_loaders(DataConfig("digits", image_size=16), batch_size=64)
    assert train.pad == 2 and not train.flip  # 1/8 of 16 px; digits are never mirrored
    _, _, flip = train.augment_params(torch.arange(1000))
    assert not flip.any()
    train, _, _ = build_loaders(DataConfig("digits", image_size=32, augment="crop+flip"), batch_size=64)
    assert train.pad == 4 and train.augment_params(torch.arange(1000))[2].any()
    train, _, _ = build_loaders(DataConfig("digits", image_size=32, augment="none"), batch_size=64)
    assert train.pad == 0 and train.augment == "none"
    with pytest.raises(ValueError, match="--augment must be one of auto, crop.flip, crop, none, got 'rotate'"):
        build_loaders(DataConfig("digits", augment="rotate"), batch_size=64)


def test_device_augmentation_matches_per_sample_reference():
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (6, 5, 7, 3), dtype=torch.uint8, generator=g)
    loader = DeviceLoader(imgs, torch.arange(6), 6, mean=(0, 0, 0), std=(1 / 255,) * 3, augment="crop+flip",
                          pad=2)
    idx = torch.tensor([3, 0, 5, 5, 1, 2, 4, 0])
    out = loader.batch(idx)
    oy, ox, flip = loader.augment_params(idx)
    assert oy.min() >= 0 and oy.max() <= 4 and ox.min() >= 0 and ox.max() <= 4
    assert torch.equal(out[2], out[3])  # the same sample, the same augmentation (independent of the batch)
    padded = torch.nn.functional.pad(imgs.permute(0, 3, 1, 2), (2, 2, 2, 2)).float()
    for b in range(len(idx)):
        ref = padded[idx[b], :, oy[b, 0]: oy[b, 0] + 5, ox[b, 0]: ox[b, 0] + 7]
        if flip[b, 0]:
            ref = ref.flip(-1)
        torch.testing.assert_close(out[b], ref)
    assert flip.any() and (~flip).any()  # both branches exercised
    loader.set_epoch(1)
    assert not torch.equal(torch.cat(loader.augment_params(torch.arange(6))), torch.cat(
        (oy[[1, 4, 5, 0, 6, 2]], ox[[1, 4, 5, 0, 6, 2]], flip[[1, 4, 5, 0, 6, 2]])))  # new draws each epoch
    big = DeviceLoader(torch.zeros(4000, 2, 2, 3, dtype=torch.uint8), torch.zeros(4000, dtype=torch.long), 8,
                       mean=(0,) * 3, std=(1,) * 3, augment="crop+flip", pad=4)
    oy, ox, flip = big.augment_params(torch.arange(4000))
    assert torch.bincount(oy.view(-1), minlength=9).min() > 300 and 0.45 < flip.float().mean() < 0.55  # spread


def test_device_loader_takes_the_augment_mode_of_every_loader():
    imgs, labels = torch.zeros(8, 6, 6, 3, dtype=torch.uint8), torch.arange(8)
    crop = DeviceLoader(imgs, labels, 4, mean=(0,) * 3, std=(1,) * 3, augment="crop", pad=2)
    assert crop.pad == 2 and not crop.augment_params(torch.arange(8))[2].any()  # crop only: never flipped
    plain = DeviceLoader(imgs, labels, 4, mean=(0,) * 3, std=(1,) * 3)
    assert plain.augment == "none" and plain.pad == 0
    with pytest.raises(ValueError, match="augment must be one of crop.flip, crop, none, got True"):
        DeviceLoader(imgs, labels, 4, mean=(0,) * 3, std=(1,) * 3, augment=True)


def test_device_loader_sharding_and_epochs():
    imgs = torch.zeros(10, 4, 4, 3, dtype=torch.uint8)
    seen = []
    for rank in range(2):
        loader = DeviceLoader(imgs, torch.arange(10), 2, mean=(0,) * 3, std=(1,) * 3, shuffle=True, rank=rank,
                              world=2, num_classes=10)
        loader.set_epoch(3)
        seen.append(torch.cat([y for _, y in loader]).tolist())
    assert sorted(seen[0] + seen[1]) == list(range(10))
    loader.set_epoch(4)
    assert torch.cat([y for _, y in loader]).tolist() != seen[1]  # reshuffled


def _write_cifar(root, num_classes):
    rng = np.random.default_rng(0)
    if num_classes == 10:
        d = root / "cifar-10-batches-py"
        d.mkdir(parents=True)
        names, key = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], b"labels"
    else:
        d = root / "cifar-100-python"
        d.mkdir(parents=True)
        names, key = ["train", "test"], b"fine_labels"
    for n in names:
        batch = {b"data": rng.integers(0, 255, (4, 3072), dtype=np.uint8), key: list(rng.integers(0, num_classes, 4))}
        with open(d / n, "wb") as f:
            pickle.dump(batch, f)


@pytest.mark.parametrize("classes", [10, 100])
def test_cifar_pickles(tmp_path, classes):
    _write_cifar(tmp_path, classes)
    (x, y), (xt, yt) = load_cifar(tmp_path, classes)
    assert x.shape == ((20 if classes == 10 else 4), 32, 32, 3) and xt.shape == (4, 32, 32, 3)
    train, val, n = build_loaders(DataConfig(f"cifar{classes}", root=str(tmp_path)), batch_size=2)
    assert n == classes and next(iter(train))[0].shape == (2, 3, 32, 32)
    # --image-size is the size trained at, whatever the data set: CIFAR is resized once, at load
    train, val, _ = build_loaders(DataConfig(f"cifar{classes}", root=str(tmp_path), image_size=24), batch_size=2)
    assert next(iter(train))[0].shape == next(iter(val))[0].shape == (2, 3, 24, 24)


def test_cifar_missing_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="Put the extracted 'cifar-10-batches-py' folder"):
        load_cifar(tmp_path, 10)
    with pytest.raises(ValueError, match="needs --data"):
        DataConfig("cifar100")
    with pytest.raises(ValueError, match="--dataset must be one of imagenet, .*, got 'svhn'"):
        DataConfig("svhn")
    with pytest.raises(TypeError, match="build_loaders takes a DataConfig"):
        build_loaders("digits", batch_size=2)


def test_synthetic():
    train, val, n = build_loaders(DataConfig("synthetic", image_size=16, synthetic_steps=4), batch_size=3,
                                  synthetic_classes=5)
    batches = list(train)
    assert len(batches) == len(train) == 4 and batches[0][0].shape == (3, 3, 16, 16) and n == 5
    assert isinstance(train, SyntheticLoader)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar_batch_that_would_run_code_is_refused(tmp_path):
    _write_cifar(tmp_path, 10)
    marker = tmp_path / "pwned"
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    batch.write_bytes(pickle.dumps({b"data": _RunsCode(marker), b"labels": [0]}))
    with pytest.raises(ValueError, match=r"data_batch_1 is not a CIFAR python batch .*posix.system|os.system"):
        load_cifar(tmp_path, 10)
    assert not marker.exists()  # nothing ran
    _write_cifar(tmp_path / "t", 10)
    batch = tmp_path / "t" / "cifar-10-batches-py" / "data_batch_1"
    batch.write_bytes(batch.read_bytes()[:100])  # truncated
    with pytest.raises(ValueError, match="data_batch_1 is not a CIFAR python batch"):
        load_cifar(tmp_path / "t", 10)


def _bomb(depth: int = 40) -> bytes:
    # a few hundred bytes of pickle: a list of two references to the previous list, `depth` times over
    # (2^40 leaves once expanded)
    out = [0]
    for _ in range(depth):
        out = [out, out]
    return pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": out})


@pytest.mark.parametrize("content, match", [
    ({b"data": {"a": 1}, b"labels": [0]}, "its data is dict, not an array of uint8 pixels"),
    ({b"data": [[300] * 3072], b"labels": [0]}, "its data is list, not an array of uint8 pixels"),
    ({b"data": np.zeros((1, 3072), np.float32), b"labels": [0]}, "its data is float32"),
    ({b"data": np.zeros((1, 3000), np.uint8), b"labels": [0]}, "3000 values, not rows of 3 x 32 x 32"),
    ({b"data": np.zeros((1, 3072), np.uint8), b"labels": None}, "its labels are NoneType, not a list"),
    ({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0.5]}, "a list holding non-integers"),
    ({b"data": np.zeros((1, 3072), np.uint8), b"labels": [300]}, r"a label 300 outside \[0, 10\)"),
    ({b"data": np.zeros((1, 3072), np.uint8), b"labels": [-1]}, r"a label -1 outside"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1]}, "2 images but 1 labels"),
    ({b"data": np.zeros((1, 3072), np.uint8), b"labels": np.array([[1]])}, "shape \\(1, 1\\), not integers"),
    (_bomb, "a list holding non-integers"),
])
def test_cifar_batches_with_wrong_content_are_one_line(tmp_path, content, match):
    _write_cifar(tmp_path, 10)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    batch.write_bytes(content() if callable(content) else pickle.dumps(content))
    assert batch.stat().st_size < 20000
    with pytest.raises(ValueError, match=f"data_batch_2 is not a CIFAR python batch \\(.*{match}") as info:
        load_cifar(tmp_path, 10)
    assert "\n" not in str(info.value)


def test_missing_extra_names_it(monkeypatch):
    import builtins

    from collab_fast.extras import MissingExtra

    real = builtins.__import__

    def no_sklearn(name, *a, **k):
        if name.startswith("sklearn"):
            raise ModuleNotFoundError("No module named 'sklearn'", name="sklearn")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_sklearn)
    monkeypatch.delitem(__import__("sys").modules, "sklearn.datasets", raising=False)
    monkeypatch.delitem(__import__("sys").modules, "sklearn", raising=False)
    with pytest.raises(MissingExtra, match=r"digits data set needs scikit-learn, which is not installed: pip install "
                                           r"'collab_fast\[train\]'"):
        load_digits(16)
