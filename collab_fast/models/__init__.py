"""Architectures and collaborative patterns: `build(arch, pattern, num_classes=..., rescale=...)`.

    from collab_fast.models import build
    model = build("resnet50", "hier4", num_classes=1000)   # CollabNet: model(x) -> [4, N, 1000]
    net = model.export_head(0)                             # a plain ResNet-50 (torchvision names)

`make_collaborative(factory, pattern, splits=[...])` does the same for any network whose forward runs its
named children in order (a user's model, a torchvision or timm model where those import).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

from torch import nn

from collab_fast.models import cifar, resnet
from collab_fast.models.collab import BEFORE_ALL, RESCALE_MODES, CollabNet, parse_pattern

__all__ = ["ARCHS", "BEFORE_ALL", "CollabNet", "build", "default_splits", "make_collaborative", "parse_pattern"]

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
    "resnet32": (cifar.resnet32, _CIFAR_RESNET_SPLITS, 10),
    "resnet110": (cifar.resnet110, _CIFAR_RESNET_SPLITS, 10),
    "densenet40_12": (cifar.densenet40_12, _DENSENET_SPLITS, 10),
}


def _arch(arch: str):
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(ARCHS)}")
    return ARCHS[arch]


def default_splits(arch: str, levels: int) -> list[str]:
    """The split points a pattern with `levels` split levels uses on `arch`."""
    _, table, _ = _arch(arch)
    if levels not in table:
        raise ValueError(f"{arch} has split points for at most {max(table)} levels (valid: "
                         f"{', '.join(f'{k}: {v}' for k, v in table.items())}); the pattern needs {levels}")
    return list(table[levels])


def make_collaborative(make_target: Callable[[], nn.Module], pattern: str, splits: Sequence[str] | None = None,
                       rescale: str = "backprop") -> nn.Module:
    """Collaborative version of any network that runs its named children in order.

    make_target builds a fresh target network per call (so copies are independently initialised); splits
    names the child after which each level splits (not needed for single and inst patterns).
    """
    factors, instances = parse_pattern(pattern)
    if not factors:
        return make_target()
    if instances:
        return CollabNet(make_target, factors, [BEFORE_ALL], rescale=rescale)
    if splits is None or len(splits) != len(factors):
        raise ValueError(f"pattern {pattern!r} has {len(factors)} split level(s): pass that many split child "
                         f"names, got {None if splits is None else list(splits)}")
    return CollabNet(make_target, factors, list(splits), rescale=rescale)


def build(arch: str, pattern: str = "single", num_classes: int | None = None, rescale: str = "backprop",
          splits: Sequence[str] | None = None, **arch_kwargs) -> nn.Module:
    """The target network (pattern "single") or its collaborative version; see collab_fast.models.collab."""
    ctor, _, default_classes = _arch(arch)
    if rescale not in RESCALE_MODES:
        raise ValueError(f"rescale must be one of {RESCALE_MODES}, got {rescale!r}")
    num_classes = default_classes if num_classes is None else num_classes
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    make_target = functools.partial(ctor, num_classes=num_classes, **arch_kwargs)
    factors, instances = parse_pattern(pattern)
    if factors and not instances and splits is None:
        splits = default_splits(arch, len(factors))
    return make_collaborative(make_target, pattern, splits, rescale)
