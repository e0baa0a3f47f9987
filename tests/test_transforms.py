"""collab_fast.data.transforms: the training batch's device-side transforms as one, in their order, built
from the data section's flags."""

import pytest
import torch

from collab_fast.data import BatchTransform, DataConfig


class _Mark:
    """A stand-in part that records the order it ran in and marks the batch."""

    def __init__(self, name, log, mixes=False):
        self.name, self.log, self.mixes = name, log, mixes

    def __call__(self, x, *rest):
        self.log.append(self.name)
        if self.mixes:
            y, _ = rest
            return x + 100, torch.nn.functional.one_hot(y, 3).float()
        return x * 2 + 1


def test_parts_run_in_order_and_only_the_mixing_changes_the_labels():
    log = []
    t = BatchTransform(auto_augment=_Mark("augment", log), erase=_Mark("erase", log), mix=_Mark("mix", log, mixes=True))
    x, y = torch.zeros(2, 3, 4, 4), torch.tensor([0, 2])
    out, target = t(x, y, step=5)
    assert log == ["augment", "erase", "mix"]
    assert torch.equal(out, ((x * 2 + 1) * 2 + 1) + 100) and target.shape == (2, 3)
    log.clear()
    out, target = BatchTransform(erase=_Mark("erase", log))(x, y, 0)
    assert log == ["erase"] and torch.equal(target, y) and torch.equal(out, x * 2 + 1)
    assert not BatchTransform() and BatchTransform(erase=_Mark("e", []))


@pytest.mark.parametrize("flags, parts", [
    ({}, None),
    ({"mixup": 0.2}, ("mix",)),
    ({"random_erase": 0.25, "cutmix": 1.0}, ("erase", "mix")),
    ({"auto_augment": "trivialaugment", "random_erase": 0.1, "mixup": 0.2}, ("auto_augment", "erase", "mix")),
])
def test_the_data_section_builds_what_its_flags_ask(flags, parts):
    t = DataConfig("digits", **flags).resolved().batch_transform(10, 3, seed=1, rank=0)
    if parts is None:
        assert t is None
        return
    assert tuple(k for k in ("auto_augment", "erase", "mix") if getattr(t, k) is not None) == parts
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    a, ta = t(x.clone(), y, 3)
    b, tb = t(x.clone(), y, 3)
    assert torch.equal(a, b) and torch.equal(ta, tb)  # seeded by (seed, rank, step): the same batch twice
    assert ta.shape == ((4, 10) if "mix" in parts else (4,))
