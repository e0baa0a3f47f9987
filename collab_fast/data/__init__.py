"""Data: DALI pipelines for image folders, device-resident small sets, label noise.

`build_loaders(...)` returns (train_loader, val_loader, num_classes) for a data set name. Every loader
yields (images float [B, 3, H, W] on the device (channels_last memory when asked), labels int64 [B] on the
device) and keeps the `Loader` protocol (collab_fast.data.loader): len() per epoch, set_epoch, iter_from,
state_dict / load_state_dict.
"""

from __future__ import annotations

from pathlib import Path

import torch

from collab_fast.cache import cache_root
from collab_fast.data.folder import (
    DaliLoader,
    DataError,
    check_dali_wheel,
    check_image,
    dali_installed,
    decode_image,
    scan_split,
)
from collab_fast.data.loader import Loader
from collab_fast.data.memory import (
    CIFAR_MEAN,
    CIFAR_STD,
    DIGITS_MEAN,
    DIGITS_STD,
    DeviceLoader,
    SyntheticLoader,
    load_cifar,
    load_digits,
)
from collab_fast.data.noise import LabelNoise
from collab_fast.data.split import split_train
from collab_fast.data.torch_folder import TorchFolderLoader
from collab_fast.data.toy import write_toy

__all__ = ["AUGMENTS", "DATASETS", "DataError", "DaliLoader", "DeviceLoader", "LabelNoise", "Loader", "SyntheticLoader",
           "TorchFolderLoader", "check_dali_wheel",
           "build_loaders", "check_image", "decode_image", "default_augment", "default_toy_dir", "scan_split", "write_toy"]

DATASETS = ("imagenet", "cifar10", "cifar100", "digits", "toy", "synthetic")
TOY_DEFAULT = {"classes": 10, "per_class": 100, "size": 96}


AUGMENTS = ("crop+flip", "crop", "none")


def default_augment(dataset: str) -> str:
    """Training augmentation that suits the data: no flips for digits (a mirrored digit is not the same
    digit), random crop + horizontal flip for natural images."""
    return "crop" if dataset == "digits" else "crop+flip"


def default_toy_dir() -> Path:
    """Where the toy folder is generated when --data is not given (deterministic, so reusable)."""
    t = TOY_DEFAULT
    return cache_root() / f"toy_c{t['classes']}_p{t['per_class']}_s{t['size']}"


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


def build_loaders(dataset: str, *, data_dir: str | None = None, batch_size: int = 256, image_size: int | None = None,
                  device: torch.device | str = "cpu", rank: int = 0, world: int = 1, seed: int = 0,
                  label_noise: float = 0.0, dtype: torch.dtype = torch.float32, channels_last: bool = True,
                  eval_batch_size: int | None = None, skip_bad_images: bool = False, check_files: bool = True,
                  num_threads: int | None = None, synthetic_classes: int = 1000, synthetic_steps: int = 100,
                  augment: str = "auto", train_samples: int | None = None, holdout: int = 0, loader: str = "auto"):
    """(train_loader, val_loader, num_classes) for `dataset`; see the module docstring. augment: "crop+flip",
    "crop" or "none" for the training set; "auto" is default_augment(dataset). train_samples / holdout: train
    on a fixed class-balanced subset, and evaluate on samples held out of the training set instead of the
    test split (see data/split.py). loader (image folders): "dali", "torch" (TorchFolderLoader: no DALI
    needed, slower), or "auto": DALI when it is installed."""
    if augment == "auto":
        augment = default_augment(dataset)
    if augment not in AUGMENTS:
        raise ValueError(f"unknown augmentation {augment!r}; valid: auto, {', '.join(AUGMENTS)}")
    if dataset not in DATASETS:
        raise ValueError(f"unknown data set {dataset!r}; valid: {', '.join(DATASETS)}")
    device = torch.device(device)
    eval_batch_size = eval_batch_size or batch_size
    if dataset == "synthetic":
        if train_samples is not None or holdout:
            raise ValueError("--train-samples and --holdout need a real data set, not synthetic")
        size = image_size or 224
        kw = dict(image_size=size, num_classes=synthetic_classes, device=device, dtype=dtype,
                  channels_last=channels_last)
        return (SyntheticLoader(batch_size, steps_per_epoch=synthetic_steps, seed=seed, **kw),
                SyntheticLoader(eval_batch_size, steps_per_epoch=2, seed=seed + 1, **kw), synthetic_classes)
    if dataset in ("digits", "cifar10", "cifar100"):
        if dataset == "digits":
            (xtr, ytr), (xte, yte) = load_digits(image_size or 32)
            mean, std, classes = DIGITS_MEAN, DIGITS_STD, 10
        else:
            if not data_dir:
                raise ValueError(f"{dataset} needs --data DIR holding the python-pickle batches")
            classes = 10 if dataset == "cifar10" else 100
            (xtr, ytr), (xte, yte) = load_cifar(data_dir, classes)
            mean, std = CIFAR_MEAN, CIFAR_STD
        if train_samples is not None or holdout:
            tr, ho = split_train(ytr, train_samples, holdout)
            if holdout:
                xte, yte = xtr[ho], ytr[ho]
            xtr, ytr = xtr[tr], ytr[tr]
        common = dict(mean=mean, std=std, device=device, rank=rank, world=world, seed=seed, dtype=dtype,
                      channels_last=channels_last, num_classes=classes)
        # The random-crop shift is 1/8 of the side (CIFAR's 4 pixels at 32), whatever the image size.
        size = xtr.shape[1]
        train = DeviceLoader(xtr, ytr, batch_size, augment=augment != "none", pad=max(1, round(size / 8)),
                             flip=augment == "crop+flip", shuffle=True, drop_last=True, label_noise=label_noise,
                             **common)
        val = DeviceLoader(xte, yte, eval_batch_size, **common)
        return train, val, classes
    root = _ensure_toy(data_dir) if dataset == "toy" else data_dir
    if not root:
        raise ValueError("imagenet needs --data DIR (DIR/train/<class>/*.JPEG and DIR/val/<class>/*.JPEG)")
    if loader not in ("auto", "dali", "torch"):
        raise ValueError(f"loader must be auto, dali or torch, got {loader!r}")
    if loader == "auto":
        loader = "dali" if dali_installed() else "torch"
    # --skip-bad-images decodes every image once (cached): the header check cannot see every bad file
    check = dict(check_files=check_files, skip_bad=skip_bad_images, decode=skip_bad_images, threads=num_threads,
                 utf8_names=loader == "dali")
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
    size = image_size or 224
    common = dict(num_classes=len(classes), image_size=size, rank=rank, world=world, seed=seed, dtype=dtype,
                  channels_last=channels_last)
    if loader == "torch":
        common.update(device=device, num_workers=num_threads)
        make = TorchFolderLoader
    else:
        check_dali_wheel(device)
        common.update(device_id=device_id, num_threads=num_threads)
        make = DaliLoader
    train = make(files, labels, batch_size, train=True, label_noise=label_noise, augment=augment, **common)
    val = make(vfiles, vlabels, eval_batch_size, train=False, **common)
    return train, val, len(classes)
