"""Derived seeds: unchanged where they fit (earlier runs keep their streams), valid and distinct beyond."""

import numpy as np
import torch

from collab_fast.seeding import seed_numpy, torch_generator, torch_seed


def test_seeds_that_fit_are_unchanged():
    for v in (0, 1, 12345, 2**32 - 1, 2**63 - 1, 2**64 - 1):
        assert torch_seed(v) == v
        a = torch.rand(3, generator=torch_generator(v))
        assert torch.equal(a, torch.rand(3, generator=torch.Generator().manual_seed(v)))
    seed_numpy(2**32 - 1)
    want = np.random.rand(3)
    np.random.seed(2**32 - 1)
    assert np.array_equal(want, np.random.rand(3))


def test_large_derived_seeds_are_valid_and_distinct():
    big = (2**63 - 1) * 1_000_003  # --seed 2^63 - 1 through a derivation: far past 64 bits
    a = torch.rand(4, generator=torch_generator(big))
    b = torch.rand(4, generator=torch_generator(big + 1))
    assert not torch.equal(a, b)
    draws = []
    for v in (2**32, 2**32 + 1, 2**63 - 1):
        seed_numpy(v)
        draws.append(np.random.rand(2))
    assert len({tuple(d) for d in draws}) == 3
