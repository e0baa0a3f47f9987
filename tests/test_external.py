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
    from collab_fast.models.external import stage_modules

    # found by a probe where no layout is declared: NHWC stages (Swin), named dense blocks, a feature inside a block
    assert stage_modules(tv_models.swin_t()) == ["features.1", "features.3", "features.5", "features.7"]
    assert stage_modules(tv_models.densenet121())[:3] == ["features.denseblock1", "features.denseblock2",
                                                          "features.denseblock3"]
    assert stage_modules(timm.create_model("xception41"))[:2] == ["blocks.1", "blocks.2"]  # not blocks.2.stack.act3


def test_model_kwargs_reach_the_model():
    model = build("timm:convnext_tiny", "ilr2", num_classes=10, drop_path_rate=0.1)
    rates = [m.drop_prob for m in model.modules() if type(m).__name__ == "DropPath"]
    assert rates and max(rates) > 0


def test_dropout_in_forward_code_runs_through_the_traced_graph():
    # timm's drop_rate is F.dropout in forward_head, not a child: running the children would skip it, so the
    # model is cut in its traced graph, whose training code drops and whose eval code does not (build checks
    # head 0 against the model's own forward in both modes, with one seed)
    model = build("timm:resnet50", "ilr2", num_classes=10, drop_rate=0.2)
    assert model.split_by == "graph" and model.splits == ["layer2"]
    head = model.levels[0][0]
    assert "training = True" in head.code(True) and "training = False" in head.code(False)


VIT = dict(img_size=32, patch_size=8, depth=4, drop_rate=0.1, proj_drop_rate=0.1, drop_path_rate=0.1)


@pytest.mark.parametrize("pattern", ["ilr2", "hier4"])
@pytest.mark.parametrize("kwargs", [dict(VIT), dict(VIT, global_pool="avg", class_token=False, reg_tokens=2)])
def test_a_vit_through_its_adapter(pattern, kwargs, tmp_path):
    # timm's VisionTransformer joins the class token and the position embedding (its own parameters) in code and
    # pools the tokens before the classifier: TokenViT runs those as children, with timm's own code. build()
    # checks head 0 against the model's forward in eval and training mode (dropout, drop-path, same seed).
    torch.manual_seed(0)
    model = build("timm:vit_small_patch16_224", pattern, num_classes=10, **kwargs)
    heads = model.num_heads
    assert model.splits == (["blocks.1"] if pattern == "ilr2" else ["blocks.1", "blocks.2"])
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([1, 7, 2])
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(2):
        loss = fused_collab_loss(model(x), y, impl="torch")
        opt.zero_grad()
        loss.backward()
        opt.step()
    trunk = dict(model.trunk.named_parameters())
    assert any(n.endswith("pos_embed") for n in trunk) and all(p.grad is not None for p in trunk.values())
    model.eval()
    with torch.no_grad():
        out = model(x)
        for k in range(heads):
            head = model.export_head(k).eval()
            fresh = timm.create_model("vit_small_patch16_224", num_classes=10, **kwargs)
            assert type(head) is type(fresh)
            fresh.load_state_dict(head.state_dict(), strict=True)
            torch.testing.assert_close(fresh.eval()(x), out[k], rtol=1e-4, atol=1e-5)
    path = tmp_path / "head0.pth"
    torch.save(model.export_head(0).state_dict(), path)
    loaded = timm.create_model("vit_small_patch16_224", num_classes=10, checkpoint_path=str(path), **kwargs).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), out[0], rtol=1e-4, atol=1e-5)


def test_a_vit_from_pretrained_weights_starts_every_copy_from_them():
    torch.manual_seed(2)
    weights = timm.create_model("vit_small_patch16_224", num_classes=10, **VIT).state_dict()
    model = build("timm:vit_small_patch16_224", "ilr2", num_classes=10, weights=weights, **VIT)
    a, b = model.levels[0]
    assert torch.equal(a["blocks__3"].attn.qkv.weight, weights["blocks.3.attn.qkv.weight"])
    assert torch.equal(a["blocks__3"].attn.qkv.weight, b["blocks__3"].attn.qkv.weight)
    assert not torch.equal(a["head"].head.weight, b["head"].head.weight)  # each head its own classifier


def test_torchvisions_vit_splits_through_its_traced_graph():
    # its class token is a parameter of the model itself, joined in code; the graph keeps it in the trunk
    torch.manual_seed(0)
    model = build("torchvision:vit_b_16", "ilr2", num_classes=10, image_size=32)
    assert model.split_by == "graph" and model.splits == ["encoder.layers.encoder_layer_5"]
    assert "class_token" in dict(model.trunk.named_parameters())
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        out = model(x)
        for k in range(2):
            fresh = tv_models.vit_b_16(num_classes=10, image_size=32).eval()
            fresh.load_state_dict(model.export_head(k).state_dict(), strict=True)
            torch.testing.assert_close(fresh(x), out[k], rtol=1e-4, atol=1e-5)


def _sweep():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("model_sweep", Path(__file__).parents[1] / "scripts" / "model_sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SWEEP = _sweep()


@pytest.mark.parametrize("pattern", ["ilr2", "hier4"])
@pytest.mark.parametrize("arch", SWEEP.CI)
def test_the_sweeps_subset_builds_and_exports_exactly(arch, pattern):
    # scripts/model_sweep.py's CI subset: each way a model reaches its split points (see CI there)
    row = SWEEP.one(arch, pattern)
    assert row["outcome"] == SWEEP.CI_OUTCOME.get((arch, pattern), "works"), row


@pytest.mark.parametrize("arch", ["timm:resnet18", "torchvision:resnet18"])
def test_single_answers_the_interface_of_every_pattern(arch):
    from collab_fast.models import as_heads

    net = build(arch, "single", num_classes=10)
    assert type(net).__module__.split(".")[0] in ("timm", "torchvision")  # the plain network, its own class
    assert net.num_heads == 1 and net.loss_factor == 1.0
    x = torch.randn(2, 3, 32, 32)
    net.eval()
    with torch.no_grad():
        logits = as_heads(net(x))
        assert logits.shape == (1, 2, 10)
        head = net.export_head(0)
        assert type(head) is type(net) and head is not net
        torch.testing.assert_close(head.eval()(x), logits[0])
    with pytest.raises(ValueError, match="head must be 0"):
        net.export_head(1)


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


@pytest.mark.parametrize("pattern", ["ilr2", "single"])
def test_the_trainer_runs_a_timm_model(tmp_path, pattern, capsys):
    from collab_fast import train

    out = tmp_path / "run"
    rc = train.main(["synthetic", "--arch", "timm:resnet18", "--pattern", pattern, "-b", "4", "--image-size", "32",
                     "--max-steps", "2", "--synthetic-steps", "2", "--epochs", "1", "--device", "cpu",
                     "--model-kwargs", "drop_path_rate=0.05", "--progress", "off", "--output", str(out)])
    assert rc == 0
    head = timm.create_model("resnet18", num_classes=1000, checkpoint_path=str(out / "head0.pth"))
    assert isinstance(head, torch.nn.Module)
    said = capsys.readouterr().out
    assert ("split after ['layer2'] (its children run in order)" in said) == (pattern == "ilr2")


@pytest.mark.parametrize("arch, chans", [("timm:resnet18", 1), ("torchvision:resnet18", 3)])
def test_grey_images_reach_timm_as_one_channel_and_torchvision_as_three(tmp_path, arch, chans):
    from test_idx import write_set

    from collab_fast import train
    from collab_fast.export import main as export_main

    root = write_set(tmp_path / "fm", n_train=16, n_test=8)
    out = tmp_path / "run"
    rc = train.main(["fashion-mnist", "--data", str(root), "--arch", arch, "--pattern", "ilr2", "-b", "4",
                     "--max-steps", "2", "--device", "cpu", "--progress", "off", "--output", str(out)])
    assert rc == 0
    head = torch.load(out / "head0.pth", weights_only=True)
    assert head["conv1.weight"].shape[1] == chans
    assert export_main([str(out / "last.pt"), "--head", "1", "-o", str(tmp_path / "h1.pth")]) == 0
    lib, name = arch.split(":")
    net = (timm.create_model(name, num_classes=10, in_chans=1) if lib == "timm"
           else tv_models.get_model(name, num_classes=10))
    net.load_state_dict(torch.load(tmp_path / "h1.pth", weights_only=True), strict=True)


_SYNTH = ["synthetic", "-b", "2", "--synthetic-steps", "1", "--epochs", "1", "--max-steps", "1", "--device", "cpu",
          "--progress", "off"]


@pytest.mark.parametrize("flags, match", [
    (["--arch", "timm:resnet18", "--model-kwargs", "num_classes=5"], "--model-kwargs num_classes: set by the trainer"),
    (["--arch", "timm:resnet18", "--model-kwargs", "pretrained=True"], "--model-kwargs pretrained: pretrained weights"),
    (["--arch", "timm:resnet18", "--model-kwargs", "rescale=none"], "--model-kwargs rescale: backprop rescaling is"),
    (["--arch", "timm:resnet18", "--model-kwargs", "drop_path_rate=0.1", "--drop-path", "0.2"],
     "--model-kwargs drop_path_rate and --drop-path set the same thing"),
    (["--arch", "timm:resnet18", "--model-kwargs", "drop_ratee=0.1", "--pattern", "ilr2"],
     r"--arch timm:resnet18 does not build with drop_ratee=0.1 \(TypeError: .*drop_ratee"),
    (["--arch", "torchvision:vgg11", "--drop-path", "0.1", "--image-size", "32"],
     r"does not build with stochastic_depth_prob=0.1 \(from --drop-path\) .*check --model-kwargs and --drop-path"),
    (["--arch", "timm:vit_tiny_patch16_224", "--image-size", "32", "--pattern", "ilr2"],
     r"does not take 32x32 images \(AssertionError: .*\); give --image-size 224 \(its size\), or --model-kwargs "
     r"img_size=32"),
    (["--arch", "torchvision:inception_v3", "--image-size", "32", "--pattern", "single"],
     r"does not take 32x32 images \(RuntimeError"),
    (["--arch", "torchvision:googlenet", "--pattern", "ilr2", "--image-size", "64"],
     r"GoogLeNet: its forward returns GoogLeNetOutputs in training mode, not one tensor of logits .*aux_logits=False"),
])
def test_model_arguments_and_sizes_a_model_refuses_are_one_line(tmp_path, capsys, flags, match):
    import re

    from collab_fast import train

    try:
        rc = train.main([*_SYNTH, *flags, "--output", str(tmp_path / "run")])
    except SystemExit as exc:  # a flag refused while parsing (argparse's exit)
        rc = exc.code
    assert rc == 2
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if "error" in ln]
    assert len(err) == 1 and re.search(match, err[0]), err


def test_a_vit_at_another_image_size_through_model_kwargs(tmp_path):
    from collab_fast import train

    assert train.main([*_SYNTH, "--arch", "timm:vit_tiny_patch16_224", "--image-size", "32", "--pattern", "ilr2",
                       "--model-kwargs", "img_size=32", "--output", str(tmp_path / "run")]) == 0
