"""What every network the builder returns answers, so callers need no hasattr: a single network is a
one-head model (num_heads 1, loss_factor 1, export_head(0) a copy of itself)."""

from __future__ import annotations

import copy

import torch
from torch import nn


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth (Huang et al. 2016) of a residual branch: in training each sample's branch is dropped
    with probability p and the kept ones scaled by 1 / (1 - p); identity in evaluation. The draw is on the
    device (no sync)."""
    if p == 0.0 or not training:
        return x
    keep = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), device=x.device, dtype=x.dtype).bernoulli_(1.0 - p)
    return x * keep.div_(1.0 - p)


def set_drop_path(blocks: list[nn.Module], rate: float) -> None:
    """Drop rates rising linearly from 0 at the first residual block to `rate` at the last (as timm does)."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"--drop-path must be in [0, 1), got {rate}")
    for i, b in enumerate(blocks):
        b.drop_path = rate * i / max(len(blocks) - 1, 1)


class SingleHead:
    """Mixin for the target networks (ResNet, CifarResNet, DenseNet)."""

    num_heads = 1
    loss_factor = 1.0

    def export_head(self, k: int = 0) -> nn.Module:
        if isinstance(k, bool) or k != 0:
            raise ValueError(f"head must be 0 for a single network, got {k!r}")
        return copy.deepcopy(self)
