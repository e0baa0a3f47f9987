"""The training batch's device-side transforms as one: auto-augment -> random erasing -> mixup/cutmix, in that
order (a policy's colour and geometry first, the erased box next, the mixing last, so that it mixes the
augmented images and their labels). Built by DataConfig.batch_transform from --auto-augment, --random-erase,
--mixup and --cutmix; the trainer calls it on each training batch."""

from __future__ import annotations

import torch

from collab_fast.data.autoaugment import AutoAugment
from collab_fast.data.erase import RandomErase
from collab_fast.data.mix import BatchMix

__all__ = ["BatchTransform"]


class BatchTransform:
    """(images, labels, step) -> (images, labels): each part, where given, on the device, with no host sync.
    The labels stay class indices [N] unless the mixing makes them probabilities [N, C]."""

    def __init__(self, auto_augment: AutoAugment | None = None, erase: RandomErase | None = None,
                 mix: BatchMix | None = None):
        self.auto_augment, self.erase, self.mix = auto_augment, erase, mix

    def __bool__(self) -> bool:
        return any(t is not None for t in (self.auto_augment, self.erase, self.mix))

    def __call__(self, x: torch.Tensor, y: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.auto_augment is not None:
            x = self.auto_augment(x, step)
        if self.erase is not None:
            x = self.erase(x, step)
        if self.mix is not None:
            x, y = self.mix(x, y, step)
        return x, y
