"""Device-resident data sets (digits, CIFAR-10/100, (Fashion-)MNIST, synthetic) and their batched
on-device augmentation.

Images are kept on the device as uint8 [N, H + 2p, W + 2p, C] (C = 3, or 1 for grey sets; zero padding
p = 4 for the random crop), and every batch is cropped, flipped and normalised by one gather and one fused
arithmetic expression, with no per-sample Python loop. Batches come out as float [B, C, H, W] in
channels_last memory (a permuted view of NHWC), labels as int64 [B], both on the device.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from collab_fast.data.loader import check_augment
from collab_fast.data.noise import LabelNoise
from collab_fast.extras import require
from collab_fast.seeding import torch_generator

__all__ = ["CIFAR_MEAN", "CIFAR_STD", "DIGITS_MEAN", "DIGITS_STD", "FASHION_MNIST_MEAN", "FASHION_MNIST_STD",
           "MNIST_MEAN", "MNIST_STD", "DeviceLoader", "SyntheticLoader", "load_cifar", "load_digits"]

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
# splitmix64's odd constants as signed int64 (two's complement)
_MIX = tuple(c - (1 << 64) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))
DIGITS_MEAN = (0.3049,) * 3  # of the 32x32 upsampled training images, scaled to [0, 1]
DIGITS_STD = (0.3234,) * 3
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)  # of the 60,000 training images, in [0, 1]
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)


def load_digits(size: int = 32):
    """scikit-learn's bundled handwritten digits (1797 real 8x8 images, 10 classes), upsampled to
    size x size, 3 channels, uint8 NHWC. Fixed split: a seeded permutation, 1437 train / 360 test."""
    d = require("sklearn.datasets", "train", "the digits data set").load_digits()
    x = torch.from_numpy(d.images).float().div(16.0).unsqueeze(1)  # [N, 1, 8, 8] in [0, 1]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    x = (x * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).permute(0, 2, 3, 1).contiguous()
    y = torch.from_numpy(d.target).long()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:1437], perm[1437:]
    return (x[tr], y[tr]), (x[te], y[te])


# A CIFAR batch is a dict of numpy arrays, lists and bytes: the only globals its pickle may name. Anything
# else (os.system, subprocess, builtins.eval: a crafted file in a data folder) is refused before it runs.
_CIFAR_GLOBALS = {(m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct", "scalar")}
_CIFAR_GLOBALS |= {("numpy", "ndarray"), ("numpy", "dtype")}


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _CIFAR_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which a CIFAR batch never holds (refused: loading it "
                                     "could run code)")


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            d = _CifarUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise ValueError(f"{path} is not a CIFAR python batch ({type(exc).__name__}: {exc or 'truncated'}); "
                         "re-extract the data set") from None
    if not isinstance(d, dict) or b"data" not in d:
        raise ValueError(f"{path} is not a CIFAR python batch (no data array); re-extract the data set")
    return d


def _cifar_arrays(d: dict, path: Path, key: bytes, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """A batch's images [n, 3, 32, 32] and labels [n], as the official batches hold them (data: a uint8 array
    of n rows of 3072 values; labels: n integers): anything else is one line naming the file. Nothing is
    converted before it is checked, so a small file of shared references cannot expand into gigabytes."""
    def bad(what: str) -> ValueError:
        return ValueError(f"{path} is not a CIFAR python batch ({what}); re-extract the data set")

    data, labels = d.get(b"data"), d.get(key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        raise bad(f"its data is {type(data).__name__ if not isinstance(data, np.ndarray) else data.dtype}, not an "
                  "array of uint8 pixels")
    if data.size == 0 or data.size % 3072:
        raise bad(f"its data holds {data.size} values, not rows of 3 x 32 x 32")
    n = data.size // 3072
    if isinstance(labels, np.ndarray):
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise bad(f"its {key.decode()} are a {labels.dtype} array of shape {labels.shape}, not integers")
        y = labels.astype(np.int64)
    elif isinstance(labels, list) and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                                          for v in labels):
        y = np.asarray(labels, dtype=np.int64) if labels else np.zeros(0, np.int64)
    else:
        kind = type(labels).__name__ if not isinstance(labels, list) else "a list holding non-integers"
        raise bad(f"its {key.decode()} are {kind}, not a list of class indices")
    if len(y) != n:
        raise bad(f"{n} images but {len(y)} {key.decode()}")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise bad(f"a label {int(y.min() if y.min() < 0 else y.max())} outside [0, {num_classes})")
    return data.reshape(n, 3, 32, 32), y


def load_cifar(root: str | Path, num_classes: int):
    """CIFAR-10/100 from the standard python-pickle batches (cifar-10-batches-py/, cifar-100-python/)."""
    if num_classes not in (10, 100):
        raise ValueError(f"CIFAR has 10 or 100 classes, got {num_classes}")
    root = Path(root)
    sub = "cifar-10-batches-py" if num_classes == 10 else "cifar-100-python"
    base = root if (root / ("data_batch_1" if num_classes == 10 else "train")).exists() else root / sub
    train_files = [base / f"data_batch_{i}" for i in range(1, 6)] if num_classes == 10 else [base / "train"]
    test_files = [base / ("test_batch" if num_classes == 10 else "test")]
    missing = [str(p) for p in train_files + test_files if not p.exists()]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-{num_classes} python batches not found: missing {missing[0]}"
            f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}. Put the extracted "
            f"'{sub}' folder (from the official cifar-{num_classes}-python.tar.gz) in {root} and pass --data {root}. "
            "Nothing is downloaded here.")
    key = b"labels" if num_classes == 10 else b"fine_labels"

    def read(files):
        xs, ys = [], []
        for f in files:
            x, y = _cifar_arrays(_unpickle(f), f, key, num_classes)
            xs.append(x)
            ys.append(y)
        x = torch.from_numpy(np.concatenate(xs)).permute(0, 2, 3, 1).contiguous()  # NHWC
        return x, torch.from_numpy(np.concatenate(ys))

    return read(train_files), read(test_files)


class DeviceLoader:
    """Batches of an in-memory image set, augmented on the device.

    Args:
        images: uint8 [N, H, W, C] (C = 1 or 3; mean and std have C entries); labels: int64 [N].
        augment: "crop+flip" (random crop with `pad`-pixel zero padding, and a horizontal flip), "crop" or "none"
            (evaluation), as --augment.
        shuffle / drop_last: per-epoch permutation (seeded, identical on every rank) / drop a short batch.
        rank, world: this process takes every world-th sample of the permutation.
        label_noise: fraction of training samples whose labels are redrawn every epoch.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, *, mean, std,
                 device: torch.device | str = "cpu", augment: str = "none", shuffle: bool = False,
                 drop_last: bool = False, pad: int = 4, rank: int = 0, world: int = 1, seed: int = 0,
                 label_noise: float = 0.0, num_classes: int | None = None, dtype: torch.dtype = torch.float32,
                 channels_last: bool = True):
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(f"images must be uint8 [N, H, W, C] with C 1 or 3, got {images.dtype} "
                             f"{tuple(images.shape)}")
        if len(mean) != images.shape[-1] or len(std) != images.shape[-1]:
            raise ValueError(f"mean and std need one entry per channel ({images.shape[-1]}), got {len(mean)} and "
                             f"{len(std)}")
        if labels.shape != images.shape[:1]:
            raise ValueError(f"labels must be [N] = [{images.shape[0]}], got {tuple(labels.shape)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.augment = check_augment(augment)
        self.pad = pad if augment != "none" else 0
        self.flip = augment == "crop+flip"
        # Padding once here; the per-batch crop is a gather from the padded images.
        x = images.permute(0, 3, 1, 2)
        x = F.pad(x, (self.pad,) * 4) if self.pad else x
        self.images = x.permute(0, 2, 3, 1).contiguous().to(self.device)  # uint8 [N, H+2p, W+2p, C]
        self.height, self.width = images.shape[1], images.shape[2]
        self.num_classes = int(num_classes if num_classes is not None else int(labels.max()) + 1)
        self.noise = LabelNoise(labels, label_noise, self.num_classes, seed) if label_noise > 0 else None
        self.labels = labels.to(self.device, torch.int64)  # this epoch's (noisy) labels
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.rank, self.world, self.seed = rank, world, seed
        self.dtype, self.channels_last = dtype, channels_last
        scale = torch.tensor(std, device=self.device) * 255.0
        self._mul = (1.0 / scale).to(dtype)  # [C]: x / (255 std) - mean / std
        self._add = (-torch.tensor(mean, device=self.device) / torch.tensor(std, device=self.device)).to(dtype)
        self.epoch = 0
        n = images.shape[0]
        self.num_samples = len(range(rank, n, world))  # this rank's share

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return -(-self.num_samples // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.noise is not None:
            self.labels = self.noise.labels_for_epoch(epoch).to(self.device)

    def _indices(self) -> torch.Tensor:
        n = self.images.shape[0]
        if self.shuffle:
            g = torch_generator(self.seed * 7_777_777 + self.epoch)
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        return order[self.rank :: self.world].to(self.device)

    def augment_params(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Crop offsets and flips [B, 1] of samples idx this epoch: a hash of (seed, epoch, sample index),
        so a sample is augmented the same way whatever its batch, rank or resume point."""
        key = (self.seed * 1_000_003 + self.epoch) * _MIX[1] % (1 << 63)
        h = idx.to(torch.int64) * _MIX[0] + key
        h = (h ^ (h >> 31)) * _MIX[2]  # int64 arithmetic wraps: a splitmix-style mix
        h = (h ^ (h >> 29)) & 0x7FFFFFFF
        span = 2 * self.pad + 1
        flip = ((h // (span * span)) % 2 == 1) & self.flip
        return (h % span)[:, None], ((h // span) % span)[:, None], flip[:, None]

    def batch(self, idx: torch.Tensor) -> torch.Tensor:
        """Crop (+ flip) and normalise images[idx] in one gather: float [B, C, H, W], channels_last."""
        h, w = self.height, self.width
        rows = torch.arange(h, device=self.device)
        cols = torch.arange(w, device=self.device)
        if self.augment != "none":
            oy, ox, flip = self.augment_params(idx)
            r = oy + rows  # [B, H]
            c = ox + torch.where(flip, w - 1 - cols, cols)  # [B, W]
            x = self.images[idx[:, None, None], r[:, :, None], c[:, None, :]]  # [B, H, W, C]
        else:
            x = self.images[idx]
        x = x.to(self.dtype) * self._mul + self._add  # NHWC, contiguous
        x = x.permute(0, 3, 1, 2)  # NCHW view of NHWC memory: channels_last
        return x if self.channels_last else x.contiguous()

    def __iter__(self):
        return self.iter_from(0)

    def state_dict(self) -> dict:
        return {}  # the position follows from (seed, epoch, batch): nothing to save

    def load_state_dict(self, state: dict) -> None:
        pass

    def iter_from(self, start: int):
        """Batches of this epoch from batch `start` on (resuming mid-epoch costs nothing here)."""
        idx = self._indices()
        for i in range(start, len(self)):
            sel = idx[i * self.batch_size : (i + 1) * self.batch_size]
            yield self.batch(sel), self.labels[sel]


class SyntheticLoader:
    """Random images already on the device (for pure-compute benchmarks): the same batch every step."""

    def __init__(self, batch_size: int, *, image_size: int, num_classes: int = 1000, steps_per_epoch: int = 100,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, channels_last: bool = True,
                 seed: int = 0):
        g = torch_generator(seed, device)
        x = torch.randn(batch_size, image_size, image_size, 3, device=device, generator=g, dtype=torch.float32)
        x = x.to(dtype).permute(0, 3, 1, 2)
        self.images = x if channels_last else x.contiguous()
        self.labels = torch.randint(num_classes, (batch_size,), device=device, generator=g)
        self.steps, self.num_classes, self.batch_size = steps_per_epoch, num_classes, batch_size
        self.num_samples = batch_size * steps_per_epoch

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def __iter__(self):
        return self.iter_from(0)

    def iter_from(self, start: int):
        for _ in range(start, self.steps):
            yield self.images, self.labels
