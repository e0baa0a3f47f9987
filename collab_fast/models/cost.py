"""Training cost of a pattern relative to the single network: parameters and FLOPs.

FLOPs are counted per child of the target network (torch.utils.flop_counter on meta tensors, so nothing
is computed). A collaborative model runs segment l once per node of tree level l, so its forward FLOPs
are sum_l copies_l * flops(segment_l). Training FLOPs are taken as 3x forward (forward + backward with
its two matmuls per layer) for both, so the training ratio equals the forward ratio.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from collab_fast.models.builder import build
from collab_fast.models.collab import CollabNet
from collab_fast.models.registry import ARCHS, native_image_size

__all__ = ["PatternCost", "child_flops", "pattern_cost"]


@dataclass
class PatternCost:
    arch: str
    pattern: str
    heads: int
    params: int  # parameters of the training graph
    params_ratio: float  # versus the single network
    train_flops: float  # per image, forward + backward (3x forward)
    flops_ratio: float  # versus the single network

    def line(self) -> str:
        return (f"{self.arch} {self.pattern}: {self.heads} head(s), {self.params / 1e6:.2f}M params "
                f"({self.params_ratio:.2f}x single), {self.train_flops / 1e9:.2f} GFLOPs/img training "
                f"({self.flops_ratio:.2f}x single)")


def child_flops(arch: str, image_size: int, num_classes: int | None = None, in_chans: int = 3) -> dict[str, float]:
    """Forward FLOPs per image of each named child of the single network (in forward order)."""
    with torch.device("meta"):  # every built-in architecture takes in_chans
        net = build(arch, "single", num_classes=num_classes, in_chans=in_chans).eval()  # batch 1: batch norm in eval mode
        x = torch.empty(1, in_chans, image_size, image_size)
    out = {}
    for name, module in net.named_children():
        if isinstance(module, torch.nn.Linear) and x.dim() > 2:
            x = x.flatten(1)
        with FlopCounterMode(display=False) as counter:
            x = module(x)
        out[name] = float(counter.get_total_flops())
    return out


def pattern_cost(arch: str, pattern: str, image_size: int | None = None, num_classes: int | None = None,
                 in_chans: int = 3) -> PatternCost:
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(ARCHS)}")
    image_size = image_size or native_image_size(arch)
    per_child = child_flops(arch, image_size, num_classes, in_chans)
    single_flops = sum(per_child.values())
    with torch.device("meta"):
        single = build(arch, "single", num_classes=num_classes, in_chans=in_chans)
        model = build(arch, pattern, num_classes=num_classes, in_chans=in_chans)
    n_single = sum(p.numel() for p in single.parameters())
    n_model = sum(p.numel() for p in model.parameters())
    if isinstance(model, CollabNet):
        flops = 0.0
        for level, names in enumerate(model.segment_names):
            copies = math.prod(model.factors[:level])
            flops += copies * sum(per_child[n] for n in names)
        heads = model.num_heads
    else:
        flops, heads = single_flops, 1
    return PatternCost(arch, pattern, heads, n_model, n_model / n_single, 3 * flops, flops / single_flops)
