"""What every network the builder returns answers, so callers need no hasattr: a single network is a
one-head model (num_heads 1, loss_factor 1, export_head(0) a copy of itself), and `as_heads` gives its [N, C]
logits the [H, N, C] shape of every other pattern."""

from __future__ import annotations

import copy
import functools

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
        return _copy_of(self, k)


def as_heads(logits: torch.Tensor) -> torch.Tensor:
    """[H, N, C] logits of any pattern: a single network's [N, C] becomes [1, N, C] (a view)."""
    return logits if logits.dim() == 3 else logits.unsqueeze(0)


def _copy_of(net: nn.Module, k: int = 0) -> nn.Module:
    if isinstance(k, bool) or k != 0:
        raise ValueError(f"head must be 0 for a single network, got {k!r}")
    return copy.deepcopy(net)


def single_head(net: nn.Module) -> nn.Module:
    """A network from elsewhere (timm, torchvision, your own) answering the single-head interface in place:
    num_heads 1, loss_factor 1.0, export_head(0) a copy. Its class and state dict stay as they are."""
    if isinstance(net, SingleHead) or getattr(net, "export_head", None) is not None:
        return net
    for name in ("num_heads", "loss_factor"):
        if hasattr(net, name):
            raise ValueError(f"{type(net).__name__} has an attribute {name!r} of its own, which the single-head "
                             "interface would shadow; train it with a collaborative pattern, or wrap it")
    net.num_heads = 1
    net.loss_factor = 1.0
    net.export_head = functools.partial(_copy_of, net)
    return net
