"""Seeds: the streams derived from --seed (0 to 2^63 - 1) and the rank, step or epoch.

Derived seeds are Python integers ((seed * K + rank) * K + step and the like), unbounded: torch's generators
take 64 bits and numpy's global seed 32. They are reduced here, unchanged wherever they already fit, so every
earlier run's streams stay what they were.
"""

from __future__ import annotations

import random

import numpy as np
import torch

__all__ = ["seed_everything", "seed_numpy", "torch_generator", "torch_seed"]


def torch_seed(value: int) -> int:
    """`value` as a torch generator seed: itself below 2^64 (every seed a run used before), else reduced."""
    return int(value) % (1 << 64)


def torch_generator(value: int, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(torch_seed(value))


def seed_numpy(value: int) -> None:
    """numpy's global generator from `value`: np.random.seed(value) below 2^32 (as before), else from its
    32-bit words (numpy's seed takes no more than 32 bits as one number)."""
    value = int(value)
    if value < 1 << 32:
        np.random.seed(value)
    else:
        np.random.seed([(value >> s) & 0xFFFFFFFF for s in range(0, value.bit_length(), 32)])


def seed_everything(seed: int, rank: int) -> None:
    """Python's and numpy's global generators per rank; torch's the same on every rank (the same initial
    weights everywhere)."""
    random.seed(seed + rank)
    seed_numpy(seed + rank)
    torch.manual_seed(torch_seed(seed))
