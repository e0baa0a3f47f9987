"""models/resnet.py: the built-in ResNets, state dicts interchangeable with torchvision's."""

import json
from pathlib import Path

import pytest
import torch

from collab_fast.models import build

try:
    import torchvision

    HAS_TORCHVISION = True
except Exception:  # the CUDA build of torchvision does not import with a CPU torch
    HAS_TORCHVISION = False


MANIFEST = Path(__file__).resolve().parents[1] / "collab_fast" / "models" / "torchvision_resnet_manifest.json"


def test_three_split_levels_on_resnet50():
    with torch.device("meta"):
        model = build("resnet50", "tree:2x2x2", num_classes=5)
        assert model(torch.empty(2, 3, 64, 64)).shape == (8, 2, 5)
    assert model.splits == ["layer1", "layer2", "layer3"]


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"])
def test_state_dict_matches_torchvision_manifest(arch):
    manifest = json.loads(MANIFEST.read_text())["models"][arch]
    with torch.device("meta"):
        ours = {k: list(v.shape) for k, v in build(arch, "single").state_dict().items()}
    assert list(ours) == list(manifest)  # same names in the same order
    assert ours == manifest


@pytest.mark.skipif(not HAS_TORCHVISION, reason="torchvision does not import here")
def test_loads_into_torchvision_resnet50():
    net = build("resnet50", "single").eval()
    tv = torchvision.models.resnet50(weights=None).eval()
    tv.load_state_dict(net.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(tv(x), net(x))
