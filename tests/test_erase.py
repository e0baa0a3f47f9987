"""collab_fast.data.erase: random erasing of a batch on its device, and the trainer's --random-erase."""

import json

import pytest
import torch
from conftest import CPU_DIGITS

from collab_fast import train
from collab_fast.data import RandomErase


def test_each_image_gets_at_most_one_rectangle_of_the_allowed_size():
    erase = RandomErase(1.0, seed=1)
    m = erase.masks(400, 32, 48, step=3, device="cpu")[:, 0]  # [N, H, W]
    frac = m.float().mean((1, 2))
    assert (frac > 0).float().mean() > 0.95  # p = 1: nearly every image (a few: no candidate fits)
    erased = frac[frac > 0]
    assert erased.min() >= 0.015 and erased.max() <= 0.37  # 2-33%, the sides rounded to pixels
    for img in m[frac > 0][:50]:  # one axis-aligned rectangle: its rows and columns form one block
        rows, cols = img.any(1).nonzero().squeeze(1), img.any(0).nonzero().squeeze(1)
        assert img[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
        assert int(img.sum()) == len(rows) * len(cols)


def test_probability_seeding_and_fill():
    erase = RandomErase(0.3, seed=0)
    m = erase.masks(2000, 16, 16, step=0, device="cpu")
    assert 0.25 < m.flatten(1).any(1).float().mean() < 0.35
    assert torch.equal(m, erase.masks(2000, 16, 16, step=0, device="cpu"))  # resume: the same erasing
    assert not torch.equal(m, erase.masks(2000, 16, 16, step=1, device="cpu"))
    assert not torch.equal(m, RandomErase(0.3, seed=0, rank=1).masks(2000, 16, 16, step=0, device="cpu"))
    x = torch.randn(8, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    y = RandomErase(1.0).__call__(x, 5)
    mask = RandomErase(1.0).masks(8, 16, 16, 5, "cpu").expand_as(x)
    assert torch.equal(y[mask], torch.zeros(int(mask.sum()))) and torch.equal(y[~mask], x[~mask])
    assert y.is_contiguous(memory_format=torch.channels_last)
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="--random-erase"):
            RandomErase(bad)


def test_trainer_flag_erases_every_training_batch(tmp_path, monkeypatch):
    steps = []
    real = RandomErase.__call__
    monkeypatch.setattr(RandomErase, "__call__", lambda self, x, step: steps.append(step) or real(self, x, step))
    out = tmp_path / "run"
    assert train.main([*CPU_DIGITS, "-b", "32", "--max-steps", "3",
                       "--random-erase", "0.25", "--output", str(out)]) == 0
    assert steps == [0, 1, 2] and json.loads((out / "config.json").read_text())["random_erase"] == 0.25
