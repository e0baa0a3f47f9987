"""models/collab.py: collaborative networks: one trunk, independent copies, gradient rescaling at split points,
export of a head, and splitting any model by its children or its traced graph."""

import math

import pytest
import torch
from torch import nn

from collab_fast.models import build, make_collaborative
from collab_fast.models.collab import CollabNet


def _grads(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss_fn(model).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _user_tree(rescale):
    return make_collaborative(UserNet, "tree:2x2x2", splits=["stem", "mid", "top"], rescale=rescale)


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
