"""Stochastic depth of the built-in residual networks (ResNet, CifarResNet): the per-sample drop of a
residual branch, and the linear rule that gives each block its rate (--drop-path)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["drop_path", "set_drop_path"]


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
