"""Data: DALI pipelines for image folders, device-resident small sets, label noise.

`DataConfig` is the trainer's `data` section (its flags and defaults); `build_loaders(data, ...)` returns
(train_loader, val_loader, num_classes) for the data set it names. Every loader yields (images float
[B, C, H, W] on the device (channels_last memory when asked; C = 3, or 1 for the grey MNIST-format sets
unless 3 are asked for), labels int64 [B] on the device) and keeps
the `Loader` protocol (collab_fast.data.loader): len() per epoch, set_epoch, iter_from, state_dict /
load_state_dict.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from collab_fast.cache import cache_root
from collab_fast.cli import check_fields, setting
from collab_fast.data.autoaugment import POLICIES, AutoAugment
from collab_fast.data.dali import DaliLoader, check_dali_wheel, dali_installed
from collab_fast.data.erase import RandomErase
from collab_fast.data.idx import IDX_SETS, load_idx_set
from collab_fast.data.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataError,
    check_image,
    class_folders,
    decode_image,
    scan_split,
)
from collab_fast.data.loader import AUGMENTS, Loader
from collab_fast.data.memory import (
    CIFAR_MEAN,
    CIFAR_STD,
    DIGITS_MEAN,
    DIGITS_STD,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    MNIST_MEAN,
    MNIST_STD,
    DeviceLoader,
    SyntheticLoader,
    load_cifar,
    load_digits,
)
from collab_fast.data.mix import BatchMix
from collab_fast.data.noise import LabelNoise
from collab_fast.data.split import split_train
from collab_fast.data.torch_folder import TorchFolderLoader
from collab_fast.data.toy import write_toy
from collab_fast.data.transforms import BatchTransform

__all__ = ["AUGMENTS", "DATASETS", "AutoAugment", "BatchMix", "BatchTransform", "Data", "DataConfig", "DataError",
           "DaliLoader", "DeviceLoader", "LabelNoise", "Loader", "RandomErase", "SyntheticLoader", "TorchFolderLoader",
           "build_loaders",
           "check_dali_wheel", "check_image", "data_channels", "decode_image", "default_augment",
           "default_image_size", "default_toy_dir", "normalization", "scan_split", "write_toy"]

DATASETS = ("imagenet", "cifar10", "cifar100", "fashion-mnist", "mnist", "digits", "toy", "synthetic")
GREY = tuple(IDX_SETS)  # one channel
TOY_DEFAULT = {"classes": 10, "per_class": 100, "size": 96}


def data_channels(dataset: str) -> int:
    """Channels of the data set's images: 1 for the grey MNIST-format sets, else 3."""
    return 1 if dataset in GREY else 3


def normalization(dataset: str, channels: int | None = None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel that the data set's loaders normalise with (images in [0, 1]); channels:
    that many entries (a grey set given as 3 equal channels), else the data set's own."""
    if dataset == "digits":
        mean, std = DIGITS_MEAN, DIGITS_STD
    elif dataset in ("cifar10", "cifar100"):
        mean, std = CIFAR_MEAN, CIFAR_STD
    elif dataset == "fashion-mnist":
        mean, std = FASHION_MNIST_MEAN, FASHION_MNIST_STD
    elif dataset == "mnist":
        mean, std = MNIST_MEAN, MNIST_STD
    else:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    if channels is not None and channels != len(mean):
        mean, std = (mean[0],) * channels, (std[0],) * channels
    return mean, std


def default_augment(dataset: str) -> str:
    """Training augmentation that suits the data: no flips for digits (a mirrored digit is not the same
    digit), random crop + horizontal flip for natural images and for Fashion-MNIST (a mirrored garment or
    shoe is the same class; Zhong et al.'s random-erasing baselines on it flip too)."""
    return "crop" if dataset in ("digits", "mnist") else "crop+flip"


def default_image_size(dataset: str) -> int:
    """Training image side when --image-size is not given: 224 for image folders (and the synthetic set,
    their stand-in), the native 28 of the MNIST-format sets, the native 32 of CIFAR and of the upscaled
    digits."""
    if dataset in GREY:
        return 28
    return 224 if dataset in ("imagenet", "toy", "synthetic") else 32


def default_toy_dir() -> Path:
    """Where the toy folder is generated when --data is not given (deterministic, so reusable)."""
    t = TOY_DEFAULT
    return cache_root() / f"toy_c{t['classes']}_p{t['per_class']}_s{t['size']}"


@dataclass
class DataConfig:
    """The data set and how it is loaded: the trainer's `data` section (python -m collab_fast.train --help)."""

    dataset: str | None = setting(None, "the data set (a --recipe may set it)", choices=DATASETS)
    root: str | None = setting(None, "data directory: imagenet/toy DIR/train/<class>/*.JPEG and DIR/val/<class>/*.JPEG; "
                                     "cifar10/100 the extracted python batches; fashion-mnist/mnist the four IDX files "
                                     "(gzipped or not; unset: the system package's folder); toy: generated when unset",
                               metavar="DIR", name="data")
    num_classes: int | None = setting(None, "set from the data set", cli=False)
    label_noise: float = setting(0.0, "fraction of training labels redrawn uniformly every epoch (paper Fig. 3)",
                                 lo=0, hi=1, hi_open=True)
    train_samples: int | None = setting(None, "train on a fixed, class-balanced subset of this many training samples (the "
                                              "same subset for every seed); unset: the whole training set", lo=1)
    holdout: int = setting(0, "hold this many training samples out (fixed, class-balanced, never trained on) and evaluate "
                              "on them instead of the test split: choose settings here, report on the test split", lo=0)
    augment: str = setting("auto", "training augmentation: random crop + horizontal flip, crop only, or none; auto: "
                                   "crop for digits and mnist (a mirrored digit is another digit), crop+flip otherwise. The "
                                   "crop shifts by up to 1/8 of the side on device-resident sets",
                           choices=("auto", *AUGMENTS))
    image_size: int | None = setting(None, "training image size; unset: 224 for image folders, 32 for CIFAR/digits, 28 "
                                           "for (fashion-)mnist (another size: resized once at load, bilinear)", lo=8,
                                     hi=8192)
    auto_augment: str = setting("none", "an AutoAugment-family policy per training image, on the device after the loader: "
                                        "trivialaugment (TrivialAugment-wide), randaugment (2 ops at magnitude 9/31) or "
                                        "autoaugment (the ImageNet policy); none: off", choices=("none", *POLICIES))
    random_erase: float = setting(0.0, "probability of random erasing (Zhong et al. 2020) per training image: a "
                                       "rectangle of 2-33% of it set to the mean colour, on the device; 0: off", lo=0,
                                  hi=1)
    mixup: float = setting(0.0, "mixup alpha (Zhang et al. 2018): each training image and its label mixed with another's, "
                                "weights lam ~ Beta(alpha, alpha), on the device; 0: off", lo=0, hi=100)
    cutmix: float = setting(0.0, "cutmix alpha (Yun et al. 2019): a box of another training image pasted in, the labels "
                                 "mixed by area; with --mixup too, each batch takes one of them at random; 0: off",
                            lo=0, hi=100)
    skip_bad_images: bool = setting(False, "skip undecodable images (counted, named) instead of failing")
    loader: str = setting("auto", "image folders: dali (GPU decode and augmentation), torch (PyTorch workers with "
                                  "Pillow: no DALI needed, slower), auto: dali where it is installed",
                          choices=("auto", "dali", "torch"))
    threads: int | None = setting(None, "DALI CPU threads or PyTorch loader workers; unset: min(8, CPU cores)", lo=1,
                                  hi=1024)
    synthetic_steps: int = setting(100, "steps per epoch of the synthetic data set", lo=1)

    def __post_init__(self):
        check_fields(self)
        if self.dataset in ("imagenet", "cifar10", "cifar100") and not self.root:
            layout = ("DIR/train/<class>/*.JPEG and DIR/val/<class>/*.JPEG" if self.dataset == "imagenet"
                      else "the extracted python batches (data_batch_1..5, test_batch or train, test)")
            raise ValueError(f"{self.dataset} needs --data DIR holding {layout}")
        if self.root and not Path(self.root).is_dir():
            raise ValueError(f"--data {self.root}: no such directory")
        if self.dataset == "synthetic" and (self.train_samples is not None or self.holdout):
            raise ValueError("--train-samples and --holdout need a real data set, not synthetic")

    def resolved(self) -> DataConfig:
        """A copy with every "unset" filled: the augmentation, the image size, the toy folder, and the number
        of classes (an image folder's: its train split's class folders)."""
        if self.dataset is None:
            raise ValueError("the data set is required (e.g. digits, imagenet), unless a --recipe sets it")
        out = copy.copy(self)  # not replace(): the default toy folder may not exist yet (generated on first use)
        out.augment = default_augment(self.dataset) if self.augment == "auto" else self.augment
        out.image_size = self.image_size or default_image_size(self.dataset)
        out.root = str(default_toy_dir()) if self.dataset == "toy" and not self.root else self.root
        out.num_classes = _num_classes(self.dataset, self.root)
        return out

    def batch_transform(self, num_classes: int, channels: int, *, seed: int, rank: int) -> BatchTransform | None:
        """The device-side transforms of each training batch these settings ask for (--auto-augment,
        --random-erase, --mixup / --cutmix, in that order), or None."""
        t = BatchTransform(
            auto_augment=AutoAugment(self.auto_augment, *normalization(self.dataset, channels), seed=seed, rank=rank)
            if self.auto_augment != "none" else None,
            erase=RandomErase(self.random_erase, seed=seed, rank=rank) if self.random_erase else None,
            mix=BatchMix(num_classes, mixup=self.mixup, cutmix=self.cutmix, seed=seed, rank=rank)
            if self.mixup or self.cutmix else None)
        return t if t else None

    def build(self, *, batch_size: int, device: torch.device, rank: int, world: int, seed: int, dtype: torch.dtype,
              channels_last: bool, channels: int) -> Data:
        """What the trainer reads: the loaders (see build_loaders), the number of classes, and the training
        batch's device-side transform."""
        train, val, num_classes = build_loaders(self, batch_size=batch_size, device=device, rank=rank, world=world,
                                                seed=seed, dtype=dtype, channels_last=channels_last, channels=channels)
        return Data(train, val, num_classes, self.batch_transform(num_classes, channels, seed=seed, rank=rank))


class Data(NamedTuple):
    """A run's data: DataConfig.build's result."""

    train: Loader
    val: Loader
    num_classes: int
    transform: BatchTransform | None  # applied to each training batch, on the device


SYNTHETIC_CLASSES = 1000  # the synthetic set stands in for ImageNet


def _num_classes(dataset: str, root: str | None) -> int | None:
    """Classes of a data set, known before loading it: fixed by the set, or an image folder's class folders
    (the train split's subfolders, as scan_split labels them); None where the folder is not there (loading
    then says why)."""
    fixed = {"digits": 10, "cifar10": 10, "cifar100": 100, "synthetic": SYNTHETIC_CLASSES,
             **{name: spec[0] for name, spec in IDX_SETS.items()}}
    if dataset in fixed:
        return fixed[dataset]
    if dataset == "toy" and not root:
        return TOY_DEFAULT["classes"]  # the default toy folder, generated on first use
    train = Path(root) / "train"
    return len(class_folders(train)) if train.is_dir() else None


def _fit_images(x: torch.Tensor, size: int, channels: int) -> torch.Tensor:
    """uint8 [N, H, W, C] images at size x size (bilinear, once at load) with `channels` channels (a grey
    image repeated: only for a network with a fixed 3-channel stem)."""
    if x.shape[1] != size or x.shape[2] != size:
        y = F.interpolate(x.permute(0, 3, 1, 2).float(), size=(size, size), mode="bilinear", align_corners=False)
        x = y.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    return x.expand(-1, -1, -1, channels).contiguous() if x.shape[-1] != channels else x


def _ensure_toy(data_dir: str | None) -> Path:
    """The toy folder: a user's --data, or the default one, generated on first use (the resolved config
    names the default folder before it exists)."""
    out = default_toy_dir()
    if data_dir and Path(data_dir).absolute() != out.absolute():
        return Path(data_dir)
    if not (out / ".complete").exists():
        write_toy(out, **TOY_DEFAULT)
        (out / ".complete").write_text("ok\n")
    return out


def build_loaders(data: DataConfig, *, batch_size: int, device: torch.device | str = "cpu", rank: int = 0,
                  world: int = 1, seed: int = 0, dtype: torch.dtype = torch.float32, channels_last: bool = True,
                  eval_batch_size: int | None = None, check_files: bool = True, synthetic_classes: int = SYNTHETIC_CLASSES,
                  channels: int | None = None):
    """(train_loader, val_loader, num_classes) for the data set `data` names; see the module docstring and
    DataConfig's fields (train_samples / holdout: data/split.py; loader "torch": TorchFolderLoader, no DALI
    needed, slower). The rest is the run's: the batch per process, the device, this process's place among
    `world`, the seed, and the images' dtype and memory format. channels: 3 gives a grey set's images as 3
    equal channels (for a network with a fixed 3-channel stem); None: the data set's own."""
    if not isinstance(data, DataConfig):
        raise TypeError(f"build_loaders takes a DataConfig, got {type(data).__name__} (e.g. DataConfig('digits'))")
    data = data.resolved()
    dataset, data_dir, augment, image_size = data.dataset, data.root, data.augment, data.image_size
    train_samples, holdout, label_noise, threads = data.train_samples, data.holdout, data.label_noise, data.threads
    device = torch.device(device)
    eval_batch_size = eval_batch_size or batch_size
    own = data_channels(dataset)
    if channels not in (None, own) and not (own == 1 and channels == 3):
        raise ValueError(f"{dataset} has {own}-channel images; they cannot be given as {channels} channels")
    channels = channels or own
    if dataset == "synthetic":
        kw = dict(image_size=image_size, num_classes=synthetic_classes, device=device, dtype=dtype,
                  channels_last=channels_last)
        return (SyntheticLoader(batch_size, steps_per_epoch=data.synthetic_steps, seed=seed, **kw),
                SyntheticLoader(eval_batch_size, steps_per_epoch=2, seed=seed + 1, **kw), synthetic_classes)
    if dataset in ("digits", "cifar10", "cifar100", *GREY):
        mean, std = normalization(dataset, channels)
        if dataset == "digits":
            (xtr, ytr), (xte, yte) = load_digits(image_size)
            classes = 10
        elif dataset in GREY:
            (xtr, ytr), (xte, yte) = load_idx_set(dataset, data_dir)
            xtr, xte = (_fit_images(x, image_size, channels) for x in (xtr, xte))
            classes = IDX_SETS[dataset][0]
        else:
            classes = 10 if dataset == "cifar10" else 100
            (xtr, ytr), (xte, yte) = load_cifar(data_dir, classes)
            xtr, xte = (_fit_images(x, image_size, channels) for x in (xtr, xte))  # --image-size resizes, once
        if train_samples is not None or holdout:
            tr, ho = split_train(ytr, train_samples, holdout)
            if holdout:
                xte, yte = xtr[ho], ytr[ho]
            xtr, ytr = xtr[tr], ytr[tr]
        common = dict(mean=mean, std=std, device=device, rank=rank, world=world, seed=seed, dtype=dtype,
                      channels_last=channels_last, num_classes=classes)
        # The random-crop shift is 1/8 of the side (CIFAR's 4 pixels at 32), whatever the image size.
        size = xtr.shape[1]
        train = DeviceLoader(xtr, ytr, batch_size, augment=augment, pad=max(1, round(size / 8)), shuffle=True,
                             drop_last=True, label_noise=label_noise, **common)
        val = DeviceLoader(xte, yte, eval_batch_size, **common)
        return train, val, classes
    root = _ensure_toy(data_dir) if dataset == "toy" else data_dir
    loader = data.loader
    if loader == "auto":
        loader = "dali" if dali_installed() else "torch"
    # --skip-bad-images decodes every image once (cached): the header check cannot see every bad file
    check = dict(check_files=check_files, skip_bad=data.skip_bad_images, decode=data.skip_bad_images,
                 threads=threads, utf8_names=loader == "dali")
    files, labels, classes = scan_split(root, "train", **check)
    if train_samples is not None or holdout:
        tr, ho = split_train(torch.tensor(labels), train_samples, holdout)
        if holdout:
            vfiles, vlabels = [files[i] for i in ho.tolist()], [labels[i] for i in ho.tolist()]
        files, labels = [files[i] for i in tr.tolist()], [labels[i] for i in tr.tolist()]
    if not holdout:
        vfiles, vlabels, _ = scan_split(root, "val", classes=classes, **check)
    device_id = device.index if device.type == "cuda" else None
    if device.type == "cuda" and device_id is None:
        device_id = torch.cuda.current_device()
    mean, std = normalization(dataset)
    common = dict(num_classes=len(classes), image_size=image_size, rank=rank, world=world, seed=seed, dtype=dtype,
                  channels_last=channels_last, mean=mean, std=std)
    if loader == "torch":
        common.update(device=device, threads=threads)
        make = TorchFolderLoader
    else:
        check_dali_wheel(device)
        common.update(device_id=device_id, threads=threads)
        make = DaliLoader
    train = make(files, labels, batch_size, train=True, label_noise=label_noise, augment=augment, **common)
    val = make(vfiles, vlabels, eval_batch_size, train=False, **common)
    return train, val, len(classes)
