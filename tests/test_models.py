"""Collaborative networks: patterns, architectures, gradient rescaling at split points, export, cost."""

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from collab_fast.models import ARCHS, build, make_collaborative, parse_pattern
from collab_fast.models.collab import CollabNet
from collab_fast.models.cost import child_flops, pattern_cost

MANIFEST = Path(__file__).resolve().parents[1] / "collab_fast" / "models" / "torchvision_resnet_manifest.json"
PATTERNS = ["single", "inst2", "inst4", "inst:3", "ilr2", "hier4", "tree:4", "tree:2x2"]
HEADS = {"single": 1, "inst2": 2, "inst4": 4, "inst:3": 3, "ilr2": 2, "hier4": 4, "tree:4": 4, "tree:2x2": 4}

try:
    import torchvision

    HAS_TORCHVISION = True
except Exception:  # the CUDA build of torchvision does not import with a CPU torch
    HAS_TORCHVISION = False


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


def test_three_split_levels_on_resnet50():
    with torch.device("meta"):
        model = build("resnet50", "tree:2x2x2", num_classes=5)
        assert model(torch.empty(2, 3, 64, 64)).shape == (8, 2, 5)
    assert model.splits == ["layer1", "layer2", "layer3"]


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


@pytest.mark.parametrize("pattern", ["ilr2", "hier4", "tree:4", "inst2"])
def test_trunk_exists_once_and_parameter_count(pattern):
    model = build("resnet32", pattern)
    single = build("resnet32", "single")
    ptrs = [p.data_ptr() for p in model.parameters()]
    assert len(ptrs) == len(set(ptrs))  # no parameter shared or duplicated
    n = {name: sum(p.numel() for p in m.parameters()) for name, m in single.named_children()}
    want = sum(math.prod(model.factors[:lvl]) * sum(n[c] for c in seg) for lvl, seg in enumerate(model.segment_names))
    assert sum(p.numel() for p in model.parameters()) == want


def test_copies_are_independently_initialised():
    model = build("resnet32", "hier4")
    w = [copies[0]["fc"].weight for copies in model.levels[-1:]][0]
    w2 = model.levels[-1][1]["fc"].weight
    assert not torch.equal(w, w2)
    assert not torch.equal(model.levels[0][0]["layer2"][0].conv1.weight, model.levels[0][1]["layer2"][0].conv1.weight)


def _grads(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss_fn(model).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _user_tree(rescale):
    return make_collaborative(UserNet, "tree:2x2x2", splits=["stem", "mid", "top"], rescale=rescale)


@pytest.mark.parametrize("pattern", ["ilr2", "hier4", "tree:2x2x2"])
def test_trunk_gradient_is_mean_of_head_gradients(pattern):
    torch.manual_seed(0)
    if pattern == "tree:2x2x2":  # three split levels, on a small user model
        make = lambda rescale: _user_tree(rescale)
    else:
        make = lambda rescale: build("resnet32", pattern, num_classes=5, rescale=rescale)
    bp = make("backprop").double().eval()
    none = make("none").double().eval()
    none.load_state_dict(bp.state_dict())
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    w = torch.randn(bp(x).shape, dtype=torch.float64)
    per_head = lambda h: (lambda m: (m(x)[h] * w[h]).sum())
    total = lambda m: (m(x) * w).sum()
    g_bp, g_none = _grads(bp, total), _grads(none, total)
    heads = [_grads(none, per_head(h)) for h in range(bp.num_heads)]
    trunk = [n for n in g_bp if n.startswith("trunk.")]
    assert trunk
    for n in trunk:
        stacked = torch.stack([g[n] for g in heads])
        torch.testing.assert_close(g_bp[n], stacked.mean(0))
        torch.testing.assert_close(g_none[n], stacked.sum(0))
    # a head's own layers learn at the single-model rate in both modes
    leaf = [n for n in g_bp if n.startswith(f"levels.{len(bp.factors) - 1}.0.")]
    for n in leaf:
        torch.testing.assert_close(g_bp[n], heads[0][n])


def test_loss_scale_attribute():
    assert build("resnet32", "hier4", rescale="loss").loss_factor == 0.25
    assert build("resnet32", "hier4", rescale="backprop").loss_factor == 1.0


@pytest.mark.parametrize("arch, pattern", [("resnet32", "hier4"), ("densenet40_12", "ilr2"), ("resnet18", "tree:4"),
                                           ("resnet32", "inst2")])
def test_export_equals_head(arch, pattern):
    torch.manual_seed(1)
    model = build(arch, pattern, num_classes=6)
    x = torch.randn(4, 3, 32, 32)
    model.train()
    for _ in range(2):  # move the batch-norm running statistics away from their initial values
        model(torch.randn(4, 3, 32, 32) * 2 + 0.5)
    model.eval()
    with torch.no_grad():
        out = model(x)
        for k in range(model.num_heads):
            net = model.export_head(k)
            assert type(net) is type(build(arch, "single"))
            assert not net.training
            torch.testing.assert_close(net(x), out[k], rtol=0, atol=0)


def test_export_head_bad_index():
    model = build("resnet32", "ilr2")
    for bad in (-1, 2, 1.0):
        with pytest.raises(ValueError, match=r"head must be an int in \[0, 2\)"):
            model.export_head(bad)


class UserNet(nn.Module):
    """A user's model: forward runs the named children in order."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.mid = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.top = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))  # a layer of its own after "top"

    def forward(self, x):
        return self.head(self.pool(self.top(self.mid(self.stem(x)))).flatten(1))


def test_generic_splitter_on_a_user_model():
    model = make_collaborative(UserNet, "tree:2x3", splits=["stem", "mid"])
    assert isinstance(model, CollabNet) and model.num_heads == 6
    x = torch.randn(2, 3, 8, 8)
    out = model(x)
    assert out.shape == (6, 2, 3)
    out.sum().backward()
    model.eval()
    with torch.no_grad():
        for k in (0, 4):
            torch.testing.assert_close(model.export_head(k)(x), model(x)[k])
    assert isinstance(model.export_head(5), UserNet)


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


# -------------------------------------------------------------------------- any model: nested splits, own tensors


class StagedNet(nn.Module):
    """Stages in a Sequential (as ConvNeXt's `stages`, EfficientNet's `blocks`), a Sequential classifier."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.stages = nn.Sequential(*[nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
                                      for _ in range(4)])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, num_classes))

    def forward(self, x):
        return self.classifier(self.pool(self.stages(self.stem(x))).flatten(1))


def test_dotted_split_points_into_nested_stages():
    x = torch.randn(2, 3, 8, 8)
    model = make_collaborative(StagedNet, "hier4", splits=["stages.1", "stages.2"], example_input=x)
    assert model.segment_names == [["stem", "stages.0", "stages.1"], ["stages.2"], ["stages.3", "pool", "classifier"]]
    out = model(x)
    assert out.shape == (4, 2, 3)
    out.square().sum().backward()
    assert model.trunk["stages__0"][0].weight.grad is not None
    model.eval()
    with torch.no_grad():
        for k in range(4):
            head = model.export_head(k)
            assert isinstance(head, StagedNet)
            torch.testing.assert_close(head(x), model(x)[k])
    # the trunk's keys of top-level children are unchanged (checkpoints of built-in archs keep loading)
    assert any(k.startswith("trunk.stem.") for k in model.state_dict())


class OwnTokenNet(StagedNet):
    def __init__(self, num_classes=3):
        super().__init__(num_classes)
        self.scale = nn.Parameter(torch.ones(()))  # a learnt parameter of the model itself

    def forward(self, x):
        return super().forward(x) * self.scale


class PoolInCodeNet(StagedNet):
    def __init__(self, num_classes=3):
        super().__init__(num_classes)
        del self.pool  # pooling in forward code, as a ViT pools its tokens

    def forward(self, x):
        return self.classifier(self.stages(self.stem(x)).mean((2, 3)))


class DropoutInCodeNet(StagedNet):
    def forward(self, x):
        return super().forward(x) * 0.5  # forward logic that is no child


@pytest.mark.parametrize("net, match", [
    (OwnTokenNet, r"OwnTokenNet has parameters or buffers of its own, outside every child .*: scale"),
    (PoolInCodeNet, r"PoolInCodeNet: running its children in order fails"),
    (DropoutInCodeNet, r"DropoutInCodeNet: head 0 differs from the model's own forward"),
])
def test_what_running_the_children_would_drop_is_refused_by_that_path(net, match):
    with pytest.raises(ValueError, match=match):
        make_collaborative(net, "ilr2", splits=["stages.1"], example_input=torch.randn(2, 3, 8, 8), split_by="children")


class DropoutInForwardNet(StagedNet):
    def forward(self, x):  # dropout in code (timm's drop_rate): only visible in training mode
        x = self.pool(self.stages(self.stem(x))).flatten(1)
        return self.classifier(nn.functional.dropout(x, 0.5, self.training))


@pytest.mark.parametrize("net", [OwnTokenNet, PoolInCodeNet, DropoutInCodeNet, DropoutInForwardNet])
@pytest.mark.parametrize("pattern", ["ilr2", "hier4"])
def test_a_forward_that_does_more_than_run_its_children_splits_through_its_traced_graph(net, pattern):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    splits = ["stages.1"] if pattern == "ilr2" else ["stages.1", "stages.2"]
    model = make_collaborative(net, pattern, splits=splits, example_input=x)  # checked in both modes
    assert model.split_by == "graph"
    out = model(x)
    out.square().sum().backward()
    assert all(p.grad is not None for p in model.parameters())  # every tensor trains, the model's own included
    if net is OwnTokenNet:  # its own parameter is used after the split: each head owns one
        assert all(hasattr(copies[0], "scale") for copies in model.levels[-1:]) and not hasattr(model.trunk, "scale")
    model.train()
    for _ in range(2):
        model(torch.randn(4, 3, 8, 8) * 2 + 1)  # batch-norm statistics move in every copy
    for mode in ("eval", "train"):
        getattr(model, mode)()
        for k in range(model.num_heads):
            head = model.export_head(k)
            assert type(head) is net and head.training == (mode == "train")
            fresh = net()
            fresh.load_state_dict(head.state_dict(), strict=True)
            fresh.train(mode == "train")
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                torch.manual_seed(3)
                want = fresh(x)
                torch.manual_seed(3)
                got = model.run_head(x, k)
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    if net is DropoutInForwardNet:  # the training graph drops, the eval graph does not
        head = model.levels[-1][0]
        assert "dropout" in head.code(True) and "training = False" in head.code(False)


def test_a_split_crossed_by_a_skip_connection_is_refused():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.b(self.a(x)) + x

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.block, self.fc = Block(), nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.block(x))

    with pytest.raises(ValueError, match="split point inside 'block': it is a Block, whose own forward"):
        make_collaborative(Net, "ilr2", splits=["block.a"], split_by="children")
    with pytest.raises(ValueError, match=r"Net: split point 'block.a' is not a cut of its traced graph: 'x', computed "
                                         r"before it, is used after it by 'add' \(a skip connection, a second path"):
        make_collaborative(Net, "ilr2", splits=["block.a"])


def test_a_split_that_leaves_the_heads_only_their_classifier_is_refused():
    # torchvision's Swin split after its last block: the heads would share everything but norm and classifier
    with pytest.raises(ValueError, match=r"ThinHeadNet: split point 'stages.3' leaves the heads no layer of their own "
                                         r"beyond the classifier"):
        make_collaborative(ThinHeadNet, "ilr2", splits=["stages.3"])
    with pytest.raises(ValueError, match=r"no layer at level 1 of their own"):
        make_collaborative(StagedNet, "hier4", splits=["stages.3", "pool"])


class ThinHeadNet(StagedNet):
    def __init__(self, num_classes=3):
        super().__init__(num_classes)
        self.classifier = nn.Linear(8, num_classes)


def test_graph_segments_keep_the_targets_names_and_train_eval_code():
    from collab_fast.models.graph import GraphSegment

    model = make_collaborative(PoolInCodeNet, "ilr2", splits=["stages.1"], example_input=torch.randn(2, 3, 8, 8))
    assert isinstance(model.trunk, GraphSegment)
    assert sorted(model.trunk.state_dict()) == sorted(k for k in PoolInCodeNet().state_dict()
                                                      if k.startswith(("stem.", "stages.0.", "stages.1.")))
    assert "mean" in model.levels[0][1].code() and model.segment_names == [["stem", "stages.0", "stages.1"],
                                                                           ["stages.2", "stages.3", "classifier"]]
    import copy

    twin = copy.deepcopy(model)  # EMA and AveragedModel copy the model
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(twin.eval()(x), model.eval()(x))
    with pytest.raises(ValueError, match="split_by must be 'auto' or one of"):
        make_collaborative(PoolInCodeNet, "ilr2", splits=["stages.1"], split_by="fx")


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


def test_pretrained_copies_differ_by_their_classifier():
    from collab_fast.models import reinit_classifier

    torch.manual_seed(0)
    weights = StagedNet().state_dict()  # stands in for a pretrained checkpoint

    def pretrained():
        net = StagedNet()
        net.load_state_dict(weights)
        return reinit_classifier(net)

    model = make_collaborative(pretrained, "inst2")
    a, b = model.levels[0][0], model.levels[0][1]
    assert torch.equal(a["stages"][0][0].weight, b["stages"][0][0].weight)  # the same features
    assert not torch.equal(a["classifier"][2].weight, b["classifier"][2].weight)  # other decision layers
    out = model(torch.randn(4, 3, 8, 8))
    assert (out[0] - out[1]).abs().max() > 1e-3  # the heads' outputs diverge from the start


# -------------------------------------------------------------------------- torchvision compatibility


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


# -------------------------------------------------------------------------- cost report


def test_resnet50_stage_fractions_match_paper_readme():
    flops = child_flops("resnet50", 224)
    total = sum(flops.values())
    frac = {k: 100 * v / total for k, v in flops.items()}
    stem = frac["conv1"] + frac["bn1"] + frac["relu"] + frac["maxpool"]
    for got, want in [(stem, 2.9), (frac["layer1"], 16.3), (frac["layer2"], 25.1), (frac["layer3"], 35.8),
                      (frac["layer4"], 19.8)]:
        assert abs(got - want) < 0.1
    assert abs(total / 2 / 1e9 - 4.09) < 0.02  # 4.09 GMACs per image


def test_pattern_cost_ratios():
    hier4 = pattern_cost("resnet50", "hier4")
    assert abs(hier4.flops_ratio - 1.95) < 0.01 and hier4.heads == 4
    assert pattern_cost("resnet50", "inst2").flops_ratio == pytest.approx(2.0)
    assert pattern_cost("resnet50", "single").params == 25_557_032
    assert 1.5 < pattern_cost("resnet50", "ilr2").flops_ratio < 1.6
    assert "1.95x single" in hier4.line()


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


def test_dropout_in_forward_code_is_refused_by_the_children_and_bn_statistics_are_left_alone():
    with pytest.raises(ValueError, match="differs from the model's own forward in training mode"):
        make_collaborative(DropoutInForwardNet, "ilr2", splits=["stages.1"], example_input=torch.randn(4, 3, 8, 8),
                           split_by="children")
    torch.manual_seed(0)
    model = make_collaborative(StagedNet, "ilr2", splits=["stages.1"])
    before = {n: b.clone() for n, b in model.named_buffers()}
    model.check_forward(torch.randn(4, 3, 8, 8))
    assert all(torch.equal(b, before[n]) for n, b in model.named_buffers()) and model.training


def test_inst1_is_single_with_the_collaborative_interface():
    # One code path for every pattern: inst:1 is the single network as a CollabNet ([1, N, C], export_head).
    torch.manual_seed(0)
    model = build("resnet32", "inst:1", num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        assert isinstance(model, CollabNet) and model.num_heads == 1 and out.shape == (1, 2, 10)
        head = model.export_head(0).eval()
        assert type(head) is type(build("resnet32", "single", num_classes=10))
        torch.testing.assert_close(head(x), out[0])


def test_drop_path_flag_reaches_each_library_and_is_refused_without_residual_blocks():
    from collab_fast.models import ModelConfig

    with pytest.raises(ValueError, match="--drop-path: densenet40_12 has no residual blocks"):
        ModelConfig(arch="densenet40_12", drop_path=0.1)
    with pytest.raises(ValueError, match="--drop-path must be in"):
        ModelConfig(drop_path=1.0)
    from collab_fast.models import builder

    seen = {}
    real = builder.build
    try:
        builder.build = lambda *a, **kw: seen.update(kw) or real("resnet32", "single", num_classes=10)
        builder.build_model(ModelConfig(arch="timm:resnet50", pattern="single", drop_path=0.1))
        assert seen["drop_path_rate"] == 0.1
        builder.build_model(ModelConfig(arch="torchvision:convnext_tiny", pattern="single", drop_path=0.2))
        assert seen["stochastic_depth_prob"] == 0.2
    finally:
        builder.build = real


def test_sync_bn_converts_on_gpus_and_refuses_on_cpu():
    from collab_fast.distributed import Dist
    from collab_fast.models.builder import sync_batchnorm

    net = build("resnet32", "ilr2", num_classes=10)
    keys = set(net.state_dict())
    assert sync_batchnorm(net, Dist(), torch.device("cpu")) is net  # one process: nothing to synchronise
    with pytest.raises(ValueError, match="--sync-bn needs CUDA"):
        sync_batchnorm(net, Dist(rank=0, world=2), torch.device("cpu"))
    out = sync_batchnorm(net, Dist(rank=0, world=2), torch.device("cuda"))  # the conversion itself runs anywhere
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in out.modules())
    assert not any(type(m) is torch.nn.BatchNorm2d for m in out.modules()) and set(out.state_dict()) == keys


_FSDP2 = """
import os, sys, torch, torch.distributed as dist, torch.multiprocessing as mp

def run(rank, store):
    dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2)
    from torch.distributed.fsdp import fully_shard
    from collab_fast import fused_collab_loss
    from collab_fast.models import build
    torch.manual_seed(0)
    ref = build("resnet32", "hier4", num_classes=10)
    torch.manual_seed(0)
    model = build("resnet32", "hier4", num_classes=10)
    for segment in [model.trunk, *[copy for level in model.levels for copy in level]]:
        fully_shard(segment)  # each head segment its own FSDP unit
    fully_shard(model)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)
    opt, ref_opt = torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(ref.parameters(), lr=0.1)
    for _ in range(2):
        loss = fused_collab_loss(model(x[4 * rank:4 * rank + 4]), y[4 * rank:4 * rank + 4])
        opt.zero_grad(); loss.backward(); opt.step()
        # the same two half-batches on one process, their mean loss (the gradient FSDP averages)
        ref_loss = (fused_collab_loss(ref(x[:4]), y[:4]) + fused_collab_loss(ref(x[4:]), y[4:])) / 2
        ref_opt.zero_grad(); ref_loss.backward(); ref_opt.step()
    err = max((p.full_tensor() - q).abs().max().item() for p, q in zip(model.parameters(), ref.parameters()))
    if rank == 0:
        print("SHARDED", type(model.trunk).__name__, type(model.levels[1][3]).__name__, "MAXERR", err, flush=True)
    dist.barrier()  # neither rank tears its group down while the other still talks to it
    dist.destroy_process_group()
    os._exit(0)  # gloo on CPU can still abort a worker in the interpreter's teardown (seen in CI): skip it

if __name__ == "__main__":
    mp.spawn(run, args=(sys.argv[1],), nprocs=2)
"""


def test_fsdp2_shards_each_head_segment(tmp_path):
    # Segments are Modules with a forward (a ModuleDict was refused by fully_shard): two CPU processes (gloo),
    # each segment an FSDP2 unit, two SGD steps equal to the unsharded model's on the same half-batches.
    import subprocess
    import sys

    script = tmp_path / "fsdp2.py"
    script.write_text(_FSDP2)
    import os

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                       os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, str(script), str(tmp_path / "store")], capture_output=True, text=True,
                         timeout=600, cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("SHARDED"))
    _, trunk, copy, _, err = line.split()
    assert trunk == copy == "FSDPSegment" and float(err) < 1e-6, line


def test_build_records_how_to_build_the_network_again():
    model = build("resnet32", "hier4", num_classes=7, splits=["layer1", "layer2"])
    assert model.build_spec == dict(arch="resnet32", pattern="hier4", num_classes=7, rescale="backprop",
                                    splits=["layer1", "layer2"])
    again = build(**model.build_spec)
    assert again.load_state_dict(model.state_dict()) is not None and again.splits == model.splits
    assert build("resnet32", "single", num_classes=7).build_spec["splits"] is None
    assert build("resnet18", "ilr2", num_classes=7, zero_init_residual=True).build_spec["zero_init_residual"] is True
    # a constructor argument that is an object (not a plain value) records no spec: it would not load under
    # weights_only=True
    from collab_fast.models.builder import _plain

    assert _plain({"a": [1, 2.0, "x", None, (True,)]}) and not _plain({"norm_layer": nn.BatchNorm2d})


def test_compile_a_traced_split_one_graph_no_breaks():
    torch._dynamo.reset()
    model = make_collaborative(PoolInCodeNet, "hier4", splits=["stages.1", "stages.2"],
                               example_input=torch.randn(2, 3, 8, 8))
    assert model.split_by == "graph"
    ex = torch._dynamo.explain(lambda a: model(a).square().sum())(torch.randn(4, 3, 8, 8))
    assert (ex.graph_count, ex.graph_break_count) == (1, 0), [str(b.reason) for b in ex.break_reasons]
    torch._dynamo.reset()


def test_the_model_section_builds_the_training_model_in_one_order(tmp_path):
    from collab_fast.distributed import Dist
    from collab_fast.models import ModelConfig

    cfg = ModelConfig(arch="resnet32", pattern="ilr2", channels_last=False)
    net, model = cfg.build(10, device=torch.device("cpu"), proc=Dist(), image_size=32, in_chans=3)
    assert model is net and net.num_heads == 2 and net.levels[0][0].fc.out_features == 10  # one process: no wrapper
    compiled = ModelConfig(arch="resnet32", pattern="single", channels_last=False, compile=True)
    net, model = compiled.build(10, device=torch.device("cpu"), proc=Dist(), image_size=32, in_chans=3)
    assert model is not net and getattr(model, "_orig_mod", None) is net  # compile wraps the bare network
    # --weights: an exported head starts every copy, a checkpoint or pattern single is loaded whole
    head = build("resnet32", "single", num_classes=10)
    torch.save(head.state_dict(), tmp_path / "head.pth")
    seeded = ModelConfig(arch="resnet32", pattern="ilr2", weights=str(tmp_path / "head.pth"), channels_last=False)
    net, _ = seeded.build(10, device=torch.device("cpu"), proc=Dist(), image_size=32, in_chans=3)
    a, b = net.levels[0][0], net.levels[0][1]
    assert torch.equal(a["layer3"][0].conv1.weight, head.layer3[0].conv1.weight)
    assert torch.equal(a["layer3"][0].conv1.weight, b["layer3"][0].conv1.weight)
    single = ModelConfig(arch="resnet32", pattern="single", weights=str(tmp_path / "head.pth"), channels_last=False)
    net, _ = single.build(10, device=torch.device("cpu"), proc=Dist(), image_size=32, in_chans=3)
    assert all(torch.equal(v, head.state_dict()[k]) for k, v in net.state_dict().items())
