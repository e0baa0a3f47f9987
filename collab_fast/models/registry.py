"""The built-in architectures (constructor, the paper's split points, default classes) and what follows
from an architecture's name alone: its native input size, its split points, the channels it takes."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from collab_fast.models import cifar, resnet

__all__ = ["ARCHS", "EXTERNAL_PREFIXES", "arch_entry", "default_splits", "input_channels", "is_builtin_resnet",
           "native_image_size"]

# name -> (constructor(num_classes), default split points by number of split levels, default classes)
# ImageNet ResNets: the paper splits after conv3_x (layer2) and conv4_x (layer3) (sec. 4.2).
# CIFAR nets: after block 1 (simple ILR sharing) and blocks 1 and 2 (hierarchical) (sec. 4.1).
_RESNET_SPLITS = {1: ["layer2"], 2: ["layer2", "layer3"], 3: ["layer1", "layer2", "layer3"]}
_CIFAR_RESNET_SPLITS = {1: ["layer1"], 2: ["layer1", "layer2"]}
_DENSENET_SPLITS = {1: ["block1"], 2: ["block1", "block2"]}
ARCHS: dict[str, tuple[Callable[..., nn.Module], dict[int, list[str]], int]] = {
    "resnet18": (resnet.resnet18, _RESNET_SPLITS, 1000),
    "resnet34": (resnet.resnet34, _RESNET_SPLITS, 1000),
    "resnet50": (resnet.resnet50, _RESNET_SPLITS, 1000),
    "resnet101": (resnet.resnet101, _RESNET_SPLITS, 1000),
    "resnet152": (resnet.resnet152, _RESNET_SPLITS, 1000),
    "resnet8": (cifar.resnet8, _CIFAR_RESNET_SPLITS, 10),
    "resnet20": (cifar.resnet20, _CIFAR_RESNET_SPLITS, 10),
    "resnet32": (cifar.resnet32, _CIFAR_RESNET_SPLITS, 10),
    "resnet44": (cifar.resnet44, _CIFAR_RESNET_SPLITS, 10),
    "resnet56": (cifar.resnet56, _CIFAR_RESNET_SPLITS, 10),
    "resnet110": (cifar.resnet110, _CIFAR_RESNET_SPLITS, 10),
    "densenet40_12": (cifar.densenet40_12, _DENSENET_SPLITS, 10),
}


EXTERNAL_PREFIXES = ("timm:", "torchvision:")


def is_builtin_resnet(arch: str) -> bool:
    """The built-in ResNets (ImageNet and CIFAR), which take zero_init_residual."""
    return arch in ARCHS and arch.startswith("resnet")


def native_image_size(arch: str) -> int:
    """The input side a built-in architecture was designed for: 224 for the ImageNet ResNets (1000 classes
    by default), 32 for the CIFAR networks."""
    return 224 if arch_entry(arch)[2] == 1000 else 32


def arch_entry(arch: str):
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(ARCHS)}, or timm:NAME / torchvision:NAME")
    return ARCHS[arch]


def default_splits(arch: str, levels: int) -> list[str]:
    """The paper's split points for `levels` split levels of a built-in architecture."""
    table = arch_entry(arch)[1]
    if levels not in table:
        raise ValueError(f"{arch} has split points for at most {max(table)} levels (valid: "
                         f"{', '.join(f'{k}: {v}' for k, v in table.items())}); the pattern needs {levels}")
    return list(table[levels])


def input_channels(arch: str, data_channels: int) -> int:
    """The channels `arch` is built to take for images of `data_channels` channels: the built-in networks
    and timm's (`in_chans`) take grey images as they are; torchvision's have a fixed 3-channel stem, so
    grey images are given to them as 3 equal channels."""
    return data_channels if arch in ARCHS or arch.startswith("timm:") else 3

