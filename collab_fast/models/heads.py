"""What every network the builder returns answers, so callers need no hasattr: a single network is a
one-head model (num_heads 1, loss_factor 1, export_head(0) a copy of itself)."""

from __future__ import annotations

import copy

from torch import nn


class SingleHead:
    """Mixin for the target networks (ResNet, CifarResNet, DenseNet)."""

    num_heads = 1
    loss_factor = 1.0

    def export_head(self, k: int = 0) -> nn.Module:
        if isinstance(k, bool) or k != 0:
            raise ValueError(f"head must be 0 for a single network, got {k!r}")
        return copy.deepcopy(self)
