"""collab_fast.data.split: the fixed class-balanced training subset and holdout, and their use by the loaders."""

import pytest
import torch

from collab_fast.data import DataConfig, build_loaders
from collab_fast.data.memory import load_digits
from collab_fast.data.split import balanced_order, split_train


def test_every_prefix_is_class_balanced_and_the_order_is_fixed():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)[torch.randperm(100)]
    order = balanced_order(labels)
    assert sorted(order.tolist()) == list(range(100))
    assert torch.equal(order, balanced_order(labels.clone()))  # not drawn from any global or --seed state
    for k in (3, 10, 30, 60):
        counts = torch.bincount(labels[order[:k]], minlength=3)
        # as even as the counts allow: classes with enough samples differ by at most one
        assert counts.max() - counts.min() <= 1 or k > 3 * 20, (k, counts)
    counts = torch.bincount(labels[order[:60]], minlength=3)
    assert counts.tolist() == [20, 20, 20]
    tr, ho = split_train(labels, 30, 10)
    assert torch.bincount(labels[ho], minlength=3).tolist() == [5, 3, 2]  # stratified: 50/30/20 of the set
    assert torch.bincount(labels[tr], minlength=3).tolist() == [10, 10, 10]


def test_train_subset_and_holdout_are_disjoint_and_the_subset_does_not_depend_on_the_holdout():
    labels = torch.arange(1000) % 10
    tr, ho = split_train(labels, 200, 300)
    assert len(tr) == 200 and len(ho) == 300 and not set(tr.tolist()) & set(ho.tolist())
    assert torch.bincount(labels[tr]).tolist() == [20] * 10 and torch.bincount(labels[ho]).tolist() == [30] * 10
    assert torch.equal(split_train(labels, 200)[0], tr)  # the same reduced set with or without a holdout
    tr_all, ho_none = split_train(labels)
    assert len(tr_all) == 1000 and len(ho_none) == 0
    assert len(split_train(labels, None, 300)[0]) == 700


@pytest.mark.parametrize("train_samples, holdout, match", [
    (0, 0, r"--train-samples 0 must be in \[1, 1000\]"),
    (801, 200, r"--train-samples 801 must be in \[1, 800\] \(1000 training samples minus --holdout 200\)"),
    (None, 1000, "--holdout 1000 must leave training samples: the training set has 1000"),
    (None, -1, "--holdout -1 must leave training samples"),
])
def test_counts_that_do_not_fit_name_the_flag(train_samples, holdout, match):
    with pytest.raises(ValueError, match=match):
        split_train(torch.arange(1000) % 10, train_samples, holdout)


def test_digits_loaders_train_on_the_subset_and_evaluate_on_the_holdout():
    pytest.importorskip("sklearn", reason="digits need scikit-learn (the train extra)")
    (xtr, ytr), (xte, _) = load_digits(8)
    train, val, _ = build_loaders(DataConfig("digits", image_size=8, train_samples=500, holdout=300, augment="none"),
                                  batch_size=50)
    assert train.num_samples == 500 and val.num_samples == 300
    tr, ho = split_train(ytr, 500, 300)
    # the held-out images are training images (never the test split), unaugmented, with their true labels
    assert torch.equal(val.images.cpu(), xtr[ho]) and torch.equal(val.labels.cpu(), ytr[ho])
    assert torch.equal(train.images.cpu(), xtr[tr])
    _, val_test, _ = build_loaders(DataConfig("digits", image_size=8, train_samples=500), batch_size=50)
    assert val_test.num_samples == 360  # no holdout: the test split
    with pytest.raises(ValueError, match="--train-samples 1200 must be in"):
        build_loaders(DataConfig("digits", image_size=8, train_samples=1200, holdout=300), batch_size=50)
    with pytest.raises(ValueError, match="need a real data set"):
        build_loaders(DataConfig("synthetic", holdout=10), batch_size=4)


def test_image_folder_holdout_comes_from_train(tmp_path):
    pytest.importorskip("nvidia.dali", reason="the folder pipeline needs DALI (pip install 'collab_fast[dali]')")
    from collab_fast.data import write_toy

    root = write_toy(tmp_path / "toy", classes=3, per_class=10, size="24x24", val_per_class=2)
    train, val, classes = build_loaders(DataConfig("toy", root=str(root), image_size=16, train_samples=12, holdout=9),
                                        batch_size=4)
    assert classes == 3 and train.num_samples == 12 and val.num_samples == 9
    assert "/train" in val.root and "/val" not in val.root
