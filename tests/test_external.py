"""timm and torchvision networks as collaborative targets (collab_fast.models.external). Needs a timm and a
torchvision that import beside torch: CI runs this file in its own environment (torch 2.14.1, torchvision
0.29.1, timm; .ci/run stage 4), the main environment skips it."""

import pytest
import torch

timm = pytest.importorskip("timm", reason="needs timm (and a torchvision built for this torch)")
tv_models = pytest.importorskip("torchvision.models")

from collab_fast import fused_collab_loss  # noqa: E402
from collab_fast.models import build  # noqa: E402

ARCHS = ["timm:resnet50", "timm:convnext_tiny", "timm:efficientnet_b0", "timm:regnety_016",
         "torchvision:resnet50", "torchvision:mobilenet_v3_large"]


def _original(arch: str, num_classes: int):
    lib, name = arch.split(":")
    if lib == "timm":
        return timm.create_model(name, num_classes=num_classes)
    return tv_models.get_model(name, num_classes=num_classes)


@pytest.mark.parametrize("pattern", ["ilr2", "hier4"])
@pytest.mark.parametrize("arch", ARCHS)
def test_build_step_and_export_every_head(arch, pattern, tmp_path):
    torch.manual_seed(0)
    model = build(arch, pattern, num_classes=10)  # auto splits; head 0 checked against the model's forward
    heads = 2 if pattern == "ilr2" else 4
    assert model.num_heads == heads and len(model.splits) == len(model.factors)
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([1, 7])
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    logits = model(x)
    assert logits.shape == (heads, 2, 10)
    loss = fused_collab_loss(logits, y, impl="torch")
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    model.eval()
    with torch.no_grad():
        out = model(x)
        for k in range(heads):
            head = model.export_head(k).eval()
            fresh = _original(arch, 10)
            assert type(head) is type(fresh)
            fresh.load_state_dict(head.state_dict(), strict=True)  # into the original class, every key
            torch.testing.assert_close(fresh.eval()(x), out[k], rtol=1e-4, atol=1e-5)
    if arch.startswith("timm:"):
        path = tmp_path / "head0.pth"
        torch.save(model.export_head(0).state_dict(), path)
        loaded = timm.create_model(arch.split(":")[1], num_classes=10, checkpoint_path=str(path)).eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), out[0], rtol=1e-4, atol=1e-5)


def test_auto_splits_are_the_papers_points():
    assert build("timm:resnet50", "hier4", num_classes=10).splits == ["layer2", "layer3"]
    assert build("timm:convnext_tiny", "hier4", num_classes=10).splits == ["stages.1", "stages.2"]
    assert build("torchvision:resnet50", "ilr2", num_classes=10).splits == ["layer2"]


def test_model_kwargs_reach_the_model():
    model = build("timm:convnext_tiny", "ilr2", num_classes=10, drop_path_rate=0.1)
    rates = [m.drop_prob for m in model.modules() if type(m).__name__ == "DropPath"]
    assert rates and max(rates) > 0


def test_dropout_in_forward_code_is_refused():
    # timm's drop_rate is F.dropout in forward_head, not a child: a collaborative copy would drop it.
    with pytest.raises(ValueError, match="differs from the model's own forward in training mode"):
        build("timm:resnet50", "ilr2", num_classes=10, drop_rate=0.2)


def test_a_vit_is_refused_in_one_line():
    # Its forward pools tokens in code and it owns cls_token / pos_embed: a split would drop them.
    with pytest.raises(ValueError, match="VisionTransformer has parameters or buffers of its own.*cls_token"):
        build("timm:vit_small_patch16_224", "ilr2", num_classes=10)


def test_pretrained_weights_start_every_copy_and_the_heads_diverge(tmp_path):
    # Random weights saved and loaded stand in for pretrained ones (no network here).
    torch.manual_seed(1)
    weights = timm.create_model("resnet50", num_classes=10).state_dict()
    model = build("timm:resnet50", "ilr2", num_classes=10, weights=weights)
    a, b = model.levels[0]
    assert torch.equal(a["layer3"][0].conv1.weight, b["layer3"][0].conv1.weight)
    assert torch.equal(a["layer3"][0].conv1.weight, weights["layer3.0.conv1.weight"])
    assert not torch.equal(a["fc"].weight, b["fc"].weight)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert (out[0] - out[1]).abs().max() > 1e-3


def test_the_trainer_runs_a_timm_model(tmp_path):
    from collab_fast import train

    out = tmp_path / "run"
    rc = train.main(["synthetic", "--arch", "timm:resnet18", "--pattern", "ilr2", "-b", "4", "--image-size", "32",
                     "--max-steps", "2", "--synthetic-steps", "2", "--epochs", "1", "--device", "cpu",
                     "--model-kwargs", "drop_path_rate=0.05", "--progress", "off", "--output", str(out)])
    assert rc == 0
    head = timm.create_model("resnet18", num_classes=1000, checkpoint_path=str(out / "head0.pth"))
    assert isinstance(head, torch.nn.Module)
