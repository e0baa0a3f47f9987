"""Label noise (paper sec. 4.1, Fig. 3): a fixed fraction of the training samples, chosen once from the
seed, gets labels redrawn uniformly over the label set every epoch; the others keep their true labels.
The evaluation set is never corrupted (loaders only apply this to training data).
"""

from __future__ import annotations

import torch

from collab_fast.seeding import torch_generator

__all__ = ["LabelNoise"]


class LabelNoise:
    def __init__(self, labels: torch.Tensor, fraction: float, num_classes: int, seed: int = 0):
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"label noise fraction must be in [0, 1], got {fraction}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.true = labels.detach().to("cpu", torch.int64)
        self.fraction = float(fraction)
        self.num_classes = int(num_classes)
        self.seed = int(seed)
        n = self.true.numel()
        g = torch_generator(self.seed)
        chosen = torch.randperm(n, generator=g)[: round(self.fraction * n)]
        self.noisy = torch.zeros(n, dtype=torch.bool)
        self.noisy[chosen] = True  # fixed for the whole run

    def labels_for_epoch(self, epoch: int) -> torch.Tensor:
        """All training labels for `epoch` (CPU int64): true labels, redrawn ones at the noisy samples."""
        if self.fraction == 0.0:
            return self.true.clone()
        g = torch_generator(self.seed * 1_000_003 + 7919 * (epoch + 1))
        redrawn = torch.randint(self.num_classes, self.true.shape, generator=g)
        return torch.where(self.noisy, redrawn, self.true)
