"""The models package's face: every built-in architecture under every pattern, bad arguments, external archs
without their library, the paper's split points, one compiled graph for model and loss."""


import pytest
import torch

from collab_fast.models import ARCHS, build, parse_pattern

PATTERNS = ["single", "inst2", "inst4", "inst:3", "ilr2", "hier4", "tree:4", "tree:2x2"]
HEADS = {"single": 1, "inst2": 2, "inst4": 4, "inst:3": 3, "ilr2": 2, "hier4": 4, "tree:4": 4, "tree:2x2": 4}

def _heads_of(model, x):
    out = model(x)
    return out if out.dim() == 3 else out.unsqueeze(0)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("pattern", PATTERNS)
def test_output_shapes_every_arch_and_pattern(arch, pattern):
    size = 64 if ARCHS[arch][2] == 1000 else 32
    with torch.device("meta"):  # shapes only: nothing is computed
        model = build(arch, pattern, num_classes=7)
        out = _heads_of(model, torch.empty(3, 3, size, size))
    assert out.shape == (HEADS[pattern], 3, 7)
    assert getattr(model, "num_heads", 1) == HEADS[pattern]


def test_real_forward_train_eval_channels_last_autocast():
    model = build("resnet32", "hier4", num_classes=10).to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.shape == (4, 4, 10) and out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (4, 4, 10)


@pytest.mark.parametrize("call, exc, match", [
    (lambda: build("resnet51", "single"), ValueError, "unknown arch 'resnet51'; valid: resnet18, resnet34"),
    (lambda: build("resnet50", "hier3"), ValueError, "unknown pattern 'hier3'; valid: single, inst2"),
    (lambda: build("resnet50", "tree:2x0"), ValueError, "branching factor must be >= 1"),
    (lambda: build("resnet32", "tree:2x2x2"), ValueError, r"resnet32 has split points for at most 2 levels"),
    (lambda: build("resnet50", "ilr2", splits=["layer5"]), ValueError,
     r"split point 'layer5' is not a module of ResNet; its children: \['conv1', "),
    (lambda: build("resnet50", "hier4", splits=["layer3", "layer2"]), ValueError, "forward order"),
    (lambda: build("resnet50", "ilr2", splits=["fc"]), ValueError, "before the last child"),
    (lambda: build("resnet50", "hier4", splits=["layer2"]), ValueError, "2 split level"),
    (lambda: build("resnet50", "ilr2", rescale="grad"), ValueError, "rescale must be one of"),
    (lambda: build("resnet50", "ilr2", num_classes=0), ValueError, "num_classes must be a positive int"),
    (lambda: parse_pattern(4), TypeError, "pattern must be a string"),
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_auto_splits_pick_the_papers_points():
    from collab_fast.models.external import pick_splits

    stages = ["layer1", "layer2", "layer3", "layer4"]
    assert pick_splits(stages, 1) == ["layer2"] and pick_splits(stages, 2) == ["layer2", "layer3"]
    assert pick_splits(stages, 3) == ["layer1", "layer2", "layer3"]
    assert pick_splits([f"blocks.{i}" for i in range(12)], 2) == ["blocks.5", "blocks.8"]
    with pytest.raises(ValueError, match="do not fit"):
        pick_splits(["a", "b"], 3)


def test_external_arch_without_the_library_is_one_line(monkeypatch):
    import sys

    from collab_fast.extras import MissingExtra

    for name in ("timm", "torchvision", "torchvision.models"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails, as where they are not installed
    for arch in ("timm:convnext_tiny", "torchvision:mobilenet_v3_large"):
        with pytest.raises(MissingExtra, match=rf"--arch {arch} needs .*does not import here"):
            build(arch, "hier4")


@pytest.mark.parametrize("pattern", ["ilr2", "hier4"])
def test_compile_model_and_loss_one_graph_no_breaks(pattern):
    # The rescaling ops are loaded when the model is built: torch.compile traces model + loss as one graph.
    from collab_fast import fused_collab_loss

    torch._dynamo.reset()
    model = build("resnet32", pattern, num_classes=10)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    ex = torch._dynamo.explain(lambda a, b: fused_collab_loss(model(a), b))(x, y)
    assert (ex.graph_count, ex.graph_break_count) == (1, 0), [str(b.reason) for b in ex.break_reasons]
    torch._dynamo.reset()
