"""Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019) of a training batch, on the batch's device.

Each sample i is paired with sample i - 1 of the same batch (a roll, so every image is used twice and the
batch needs no second draw). With lam ~ Beta(alpha, alpha):

    mixup:   x'_i = lam x_i + (1 - lam) x_{i-1}
    cutmix:  x'_i = x_i with a box of area (1 - lam) of the image pasted from x_{i-1}; lam is then
             recomputed from the box as clipped to the image
    target:  t_i  = lam onehot(y_i) + (1 - lam) onehot(y_{i-1})     ([N, C], what the loss takes)

When both are on, each batch takes one of them with equal odds (as torchvision's reference scripts do).
lam, the choice and the box come from a host generator seeded by (seed, rank, step): nothing is read back
from the device, and a resumed run mixes its batches exactly as the uninterrupted one did.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["BatchMix"]


class BatchMix:
    """(images [N, 3, H, W], labels [N]) -> (mixed images, probabilities [N, C] float32)."""

    def __init__(self, num_classes: int, *, mixup: float = 0.0, cutmix: float = 0.0, seed: int = 0, rank: int = 0):
        if mixup < 0 or cutmix < 0 or not (mixup > 0 or cutmix > 0):
            raise ValueError(f"BatchMix needs mixup > 0 or cutmix > 0 (alphas of Beta(a, a)), got {mixup}, {cutmix}")
        self.num_classes, self.mixup, self.cutmix, self.seed, self.rank = num_classes, mixup, cutmix, seed, rank

    def draw(self, step: int, height: int, width: int) -> tuple[str, float, tuple[int, int, int, int] | None]:
        """("mixup" | "cutmix", lam, cutmix box (top, bottom, left, right) or None) of step `step`."""
        g = np.random.default_rng([self.seed, self.rank, step])
        use_cutmix = self.cutmix > 0 and (self.mixup <= 0 or g.random() < 0.5)
        alpha = self.cutmix if use_cutmix else self.mixup
        lam = float(g.beta(alpha, alpha))
        if not use_cutmix:
            return "mixup", lam, None
        ratio = math.sqrt(1.0 - lam)
        cut_h, cut_w = int(height * ratio), int(width * ratio)
        cy, cx = int(g.integers(height)), int(g.integers(width))
        top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
        left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
        lam = 1.0 - (bottom - top) * (right - left) / (height * width)  # the box as clipped
        return "cutmix", lam, (top, bottom, left, right)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        kind, lam, box = self.draw(step, x.shape[-2], x.shape[-1])
        other = x.roll(1, 0)
        if kind == "mixup":
            mixed = torch.lerp(other, x, lam)  # lam x + (1 - lam) other; a new tensor (the loader's is kept)
        else:
            top, bottom, left, right = box
            mixed = x.clone(memory_format=torch.preserve_format)
            mixed[:, :, top:bottom, left:right] = other[:, :, top:bottom, left:right]
        # scatter, not F.one_hot: no check that reads the labels back to the host
        onehot = torch.zeros(y.shape[0], self.num_classes, device=y.device).scatter_(1, y.view(-1, 1), 1.0)
        return mixed, torch.lerp(onehot.roll(1, 0), onehot, lam)
