"""Fixed subsets of a training set: a reduced, class-balanced training set (`--train-samples`) and a
stratified validation set held out of the training data (`--holdout`), so that settings can be chosen
without looking at the test split.

Each class's samples get an order drawn once from a fixed generator (not from --seed: every run and seed
sees the same subsets). The holdout takes each class's last samples in that order, in proportion to the
class's size; the training subset interleaves the classes' first samples by rank, so that it holds every
class as evenly as the counts allow. A reduced training set is therefore the same with or without a
holdout, unless a class runs out of samples.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["balanced_order", "split_train"]

_ORDER_SEED = 20181203  # fixed on purpose: the subsets must not change with --seed


def _class_orders(labels: torch.Tensor) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(_ORDER_SEED)
    out = {}
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        out[c] = idx[torch.randperm(idx.numel(), generator=g)]
    return out


def _interleave(groups: list[torch.Tensor], n: int) -> torch.Tensor:
    """Indices of all groups ordered by rank within their group, ties broken by a fixed random key."""
    if not groups:
        return torch.zeros(0, dtype=torch.int64)
    idx = torch.cat(groups)
    rank = torch.cat([torch.arange(len(g)) for g in groups])
    key = torch.rand(n, generator=torch.Generator().manual_seed(_ORDER_SEED + 1))[idx]
    return idx[torch.from_numpy(np.lexsort((key.numpy(), rank.numpy())))]


def balanced_order(labels: torch.Tensor) -> torch.Tensor:
    """A permutation of range(N) (int64 [N]) whose every prefix is as class-balanced as the counts allow."""
    labels = labels.detach().to("cpu", torch.int64)
    return _interleave(list(_class_orders(labels).values()), labels.numel())


def _stratified_counts(sizes: list[int], total: int) -> list[int]:
    """`total` split over classes in proportion to their sizes (largest remainders), each within its size."""
    n = sum(sizes)
    exact = [total * s / n for s in sizes]
    counts = [int(e) for e in exact]
    for i in sorted(range(len(sizes)), key=lambda i: exact[i] - counts[i], reverse=True)[: total - sum(counts)]:
        counts[i] += 1
    return counts


def split_train(labels: torch.Tensor, train_samples: int | None = None, holdout: int = 0):
    """(train indices, holdout indices) into a training set of N labels: a stratified holdout of `holdout`
    samples, and the first `train_samples` (unset: all the rest) of the remaining samples' balanced order.
    Raises ValueError naming the flag when the counts do not fit."""
    labels = labels.detach().to("cpu", torch.int64)
    n = int(labels.numel())
    holdout = int(holdout or 0)
    if holdout < 0 or holdout >= n:
        raise ValueError(f"--holdout {holdout} must leave training samples: the training set has {n}")
    room = n - holdout
    if train_samples is None:
        train_samples = room
    if not 1 <= train_samples <= room:
        what = f"{n} training samples" + (f" minus --holdout {holdout}" if holdout else "")
        raise ValueError(f"--train-samples {train_samples} must be in [1, {room}] ({what})")
    orders = list(_class_orders(labels).values())
    counts = _stratified_counts([len(o) for o in orders], holdout)
    held = [o[len(o) - k :] for o, k in zip(orders, counts)]
    kept = [o[: len(o) - k] for o, k in zip(orders, counts)]
    ho = torch.cat(held) if held else torch.zeros(0, dtype=torch.int64)
    return _interleave(kept, n)[:train_samples], ho.sort().values
