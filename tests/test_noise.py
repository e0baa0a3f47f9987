"""data/noise.py: symmetric label noise, redrawn each epoch, on training labels only."""

import pytest
import torch

from collab_fast.data import DataConfig, LabelNoise, build_loaders
from collab_fast.data.memory import load_digits


def test_label_noise_fraction_and_redraw():
    true = torch.arange(1000) % 10
    noise = LabelNoise(true, 0.3, 10, seed=5)
    assert int(noise.noisy.sum()) == 300
    e0, e1 = noise.labels_for_epoch(0), noise.labels_for_epoch(1)
    assert torch.equal(e0[~noise.noisy], true[~noise.noisy])  # clean samples keep their labels
    assert torch.equal(e1[~noise.noisy], true[~noise.noisy])
    assert (e0[noise.noisy] != e1[noise.noisy]).float().mean() > 0.5  # redrawn every epoch
    assert torch.equal(e0, noise.labels_for_epoch(0))  # reproducible
    assert torch.equal(LabelNoise(true, 0.3, 10, seed=5).noisy, noise.noisy)  # fixed from the seed
    wrong = (e0 != true).float().mean().item()
    assert 0.3 * 0.9 - 0.05 < wrong < 0.3 * 0.9 + 0.05  # a redraw keeps the true label 1/10 of the time
    with pytest.raises(ValueError, match="fraction"):
        LabelNoise(true, 1.5, 10)


def test_label_noise_in_loaders_train_only():
    train, val, _ = build_loaders(DataConfig("digits", label_noise=0.5), batch_size=1437, seed=1)
    (_, ytrue), (_, yval) = load_digits()
    train.set_epoch(0)
    assert 0.35 < (train.labels.cpu() != ytrue).float().mean().item() < 0.55
    assert torch.equal(torch.cat([y for _, y in val]).cpu(), yval)  # evaluation labels are never corrupted
