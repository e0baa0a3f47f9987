"""What every network the builder returns answers, so callers need no hasattr: a single network is a
one-head model (num_heads 1, loss_factor 1, export_head(0) a copy of itself), and `as_heads` gives its [N, C]
logits the [H, N, C] shape of every other pattern."""

from __future__ import annotations

import copy
import functools

import torch
from torch import nn


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
