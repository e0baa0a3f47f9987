"""The contract every training and evaluation loader keeps (DaliLoader, TorchFolderLoader, DeviceLoader,
SyntheticLoader), and all the trainer relies on. Its state follows the ecosystem's `Stateful` convention
(`state_dict` / `load_state_dict`, as torch.utils.data's StatefulDataLoader and torchtitan use).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import torch

__all__ = ["AUGMENTS", "Loader", "check_augment", "default_threads"]

# Training augmentation, one mode string for every loader (--augment): random crop + horizontal flip, crop only,
# or none (evaluation loaders take "none").
AUGMENTS = ("crop+flip", "crop", "none")


def check_augment(augment: str) -> str:
    if augment not in AUGMENTS:
        raise ValueError(f"augment must be one of {', '.join(AUGMENTS)}, got {augment!r}")
    return augment


def default_threads() -> int:
    """Loader parallelism where --threads is unset, the one rule for every loader and check: DALI's CPU
    threads, the PyTorch loader's worker processes, the image-decode check's thread pool: min(8, CPU cores)."""
    return max(1, min(8, os.cpu_count() or 1))


@runtime_checkable
class Loader(Protocol):
    """(images [B, 3, S, S] on the device, labels [B] int64 on the device) batches of one process's shard."""

    num_classes: int

    def __len__(self) -> int:
        """Batches per epoch of this process's shard."""
        ...

    def set_epoch(self, epoch: int) -> None:
        """Makes the next iteration epoch `epoch` (its order, augmentation and noisy labels)."""
        ...

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This epoch's batches from the first (or from where load_state_dict left the loader)."""
        ...

    def iter_from(self, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This epoch's batches from batch `start` on (resuming mid-epoch)."""
        ...

    def state_dict(self) -> dict:
        """What resumes the loader exactly where the batches consumed so far leave it (plain values: a
        checkpoint holds it). {} where the position follows from (seed, epoch, batch) alone."""
        ...

    def load_state_dict(self, state: dict) -> None:
        """Continues from `state` (a state_dict() of a loader built with the same arguments)."""
        ...
