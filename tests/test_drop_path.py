"""collab_fast.models.drop_path: stochastic depth of the built-in residual networks."""

import pytest
import torch

from collab_fast.models import build
from collab_fast.models.drop_path import drop_path


def test_drop_path_drops_residual_branches_in_training_only():
    x = torch.ones(4000, 3)
    y = drop_path(x, 0.25, training=True)
    kept = (y[:, 0] != 0).float().mean().item()
    assert 0.71 < kept < 0.79 and torch.allclose(y[y != 0], torch.tensor(1 / 0.75))
    assert drop_path(x, 0.25, training=False) is x and drop_path(x, 0.0, training=True) is x
    net = build("resnet32", "ilr2", num_classes=10, drop_path=0.2)
    rates = [m.drop_path for m in net.modules() if type(m).__name__ == "_CifarBlock"]
    assert len(rates) > 15 and max(rates) == pytest.approx(0.2) and min(rates) == 0.0
    plain = build("resnet32", "ilr2", num_classes=10)
    assert net.state_dict().keys() == plain.state_dict().keys()  # no new parameters: heads export as before
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    net.train()
    a, b = net(x), net(x)
    assert not torch.equal(a, b)  # random in training
    net.eval()
    assert torch.equal(net(x), net(x))
    r50 = build("resnet50", "single", drop_path=0.1)
    assert max(m.drop_path for m in r50.modules() if type(m).__name__ == "Bottleneck") == pytest.approx(0.1)
