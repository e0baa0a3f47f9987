"""Random erasing (Zhong et al. 2020) of a normalised training batch, on the batch's device.

Each image, with probability p, gets one rectangle set to 0 (the data set's mean colour after
normalisation, torchvision's default): area 2-33% of the image, aspect ratio log-uniform in [0.3, 3.3];
of 10 candidate rectangles the first that fits is used, and an image none fits keeps its pixels (as
torchvision's RandomErasing retries). All draws come from a generator on the device seeded by (seed,
rank, step): no host sync, and a resumed run erases exactly what the uninterrupted one did.
"""

from __future__ import annotations

import math

import torch

from collab_fast.seeding import torch_generator

__all__ = ["RandomErase"]

_ATTEMPTS = 10


class RandomErase:
    def __init__(self, p: float, *, seed: int = 0, rank: int = 0, area=(0.02, 1 / 3), ratio=(0.3, 3.3)):
        if not 0.0 < p <= 1.0:
            raise ValueError(f"--random-erase must be in (0, 1], got {p}")
        self.p, self.seed, self.rank, self.area, self.ratio = p, seed, rank, area, ratio

    def masks(self, n: int, height: int, width: int, step: int, device) -> torch.Tensor:
        """[N, 1, H, W] bool: the pixels erased at step `step`."""
        g = torch_generator((self.seed * 1_000_003 + self.rank) * 1_000_003 + step, device)
        u = torch.rand(n, _ATTEMPTS, 4, device=device, generator=g)
        area = height * width * (self.area[0] + (self.area[1] - self.area[0]) * u[..., 0])
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = torch.exp(log_lo + (log_hi - log_lo) * u[..., 1])
        h = torch.sqrt(area * aspect).round()
        w = torch.sqrt(area / aspect).round()
        fits = (h < height) & (w < width) & (h > 0) & (w > 0)  # [N, A]
        first = fits.int().argmax(1, keepdim=True)  # the first candidate that fits (0 if none: masked below)
        pick = lambda t: t.gather(1, first).squeeze(1)  # noqa: E731
        h, w = pick(h), pick(w)
        top = (pick(u[..., 2]) * (height - h + 1)).floor()
        left = (pick(u[..., 3]) * (width - w + 1)).floor()
        on = fits.any(1) & (torch.rand(n, device=device, generator=g) < self.p)  # [N]
        rows = torch.arange(height, device=device).view(1, height, 1)
        cols = torch.arange(width, device=device).view(1, 1, width)
        inside = ((rows >= top.view(-1, 1, 1)) & (rows < (top + h).view(-1, 1, 1))
                  & (cols >= left.view(-1, 1, 1)) & (cols < (left + w).view(-1, 1, 1)))
        return (inside & on.view(-1, 1, 1)).unsqueeze(1)

    def __call__(self, x: torch.Tensor, step: int) -> torch.Tensor:
        mask = self.masks(x.shape[0], x.shape[-2], x.shape[-1], step, x.device)
        # a new tensor in the batch's layout (masked_fill's broadcast result would drop channels-last)
        return x.clone(memory_format=torch.preserve_format).masked_fill_(mask, 0.0)
