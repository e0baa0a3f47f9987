"""--model-ema: an exponential moving average of the weights (Polyak averaging), updated after every
optimizer step on the device with no host sync, evaluated beside the model and saved in its checkpoints.

    ema = decay * ema + (1 - decay) * w        (floating-point parameters and buffers: BN statistics too)

Integer buffers (BatchNorm's step count) are copied. A step skipped by --skip-nonfinite leaves the average
as it was. The averaged network has the trained network's class, so every head of it exports the same way
(python -m collab_fast.export CKPT --ema).

The same average as timm's ModelEmaV3 at a constant decay (tested): both copy the network when built, so the
average starts from the initial weights; torch's AveragedModel copies at its first update instead.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from collab_fast.optim import lerp_

__all__ = ["ModelEMA"]


class ModelEMA:
    def __init__(self, net: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"--model-ema must be in (0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(net).eval().requires_grad_(False)
        self._pair(net)

    def _pair(self, net: nn.Module) -> None:
        ours, theirs = self.module.state_dict(keep_vars=True), net.state_dict(keep_vars=True)
        names = [k for k, v in ours.items() if v.is_floating_point()]
        self._avg = [ours[k].data for k in names]
        self._src = [theirs[k].data for k in names]
        ints = [k for k, v in ours.items() if not v.is_floating_point()]
        self._copy_dst, self._copy_src = [ours[k].data for k in ints], [theirs[k].data for k in ints]

    @torch.no_grad()
    def update(self, skipped: torch.Tensor | None = None) -> None:
        """One step of the average; `skipped` (0-dim, 1 = the step was skipped) leaves it as it was."""
        if not self._avg:
            return
        w = 1.0 - self.decay
        if skipped is None:
            torch._foreach_lerp_(self._avg, self._src, w)
        else:
            lerp_(self._avg, self._src, (1.0 - skipped.float()) * w)
        if self._copy_dst:  # one multi-tensor copy, not one kernel per BatchNorm counter
            torch._foreach_copy_(self._copy_dst, self._copy_src)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)
