"""Numeric health of a run: whether the weights and a reported number are finite. The trainer asks before
anything becomes last.pt, best.pt or head0.pth, and when a step is skipped or the run stops."""

from __future__ import annotations

import math

import torch

__all__ = ["finite_model", "finite_number"]


def finite_model(net: torch.nn.Module) -> bool:
    """Every parameter and floating buffer finite (one host sync)."""
    ts = [t for t in list(net.parameters()) + list(net.buffers()) if t.is_floating_point()]
    if not ts:
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in ts]).all())


def finite_number(x) -> bool:
    """A Python int or float that is neither inf nor nan."""
    return isinstance(x, (int, float)) and math.isfinite(x)
