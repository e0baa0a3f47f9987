"""scaler.LossScaler: torch.amp.GradScaler's dynamic loss scaling, step for step, in a form Dynamo traces."""

import pytest
import torch
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode

from collab_fast.optim import OptimConfig, make_optimizer
from collab_fast.scaler import LossScaler

OPTIMIZERS = ["sgd", "adamw", "lamb", "lars"]
POISONED = (0, 5)  # steps whose loss is inf: the first (no optimizer state yet) and a later one
# Graph breaks that torch.optim puts there itself (its no_grad boundary; the fused SGD/AdamW kernels are marked
# not to be traced). GradScaler adds "Attempted to inline function marked as skipped" for each of its calls.
TORCH_OPTIM_BREAKS = {"Call to `torch._dynamo.graph_break()`", "Skip calling `torch.compiler.disable()`d function"}


class _Reads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func._schema.name.split("::")[-1])
        return func(*args, **(kwargs or {}))


def _train(name: str, kind: str, clip: bool, compiled: bool = False, steps: int = 9):
    """`steps` fp16-style steps of a small model (losses large enough to overflow at the first scales, inf at
    POISONED) with torch's GradScaler ("torch") or LossScaler ("ours"); growth every 3 good steps."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    opt = make_optimizer(model, OptimConfig(optimizer=name, lr=0.01, wd=1e-3))
    kw = dict(init_scale=2.0**20, growth_interval=3)
    scaler = torch.amp.GradScaler("cpu", **kw) if kind == "torch" else LossScaler(opt, **kw)

    def update():
        if clip:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        scaler.step(opt)
        scaler.update()

    run = torch.compile(update, backend="aot_eager") if compiled else update
    scales = []
    for t in range(steps):
        x = torch.randn(32, 8) * (3e3 if t == 3 else 1.0)
        loss = model(x).square().mean() * (float("inf") if t in POISONED else 1.0)
        scaler.scale(loss).backward()
        run()
        opt.zero_grad(set_to_none=True)
        scales.append(float(scaler.get_scale()))
    return [p.detach().clone() for p in model.parameters()], scales, scaler.state_dict()


@pytest.mark.parametrize("clip", [False, True], ids=["step", "unscale-clip-step"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_same_steps_and_scales_as_grad_scaler(name, clip):
    # The same ATen ops in the same order: bit for bit GradScaler's weights and scales, skipped steps (the
    # first included) and growth included.
    want, want_scales, want_state = _train(name, "torch", clip)
    got, scales, state = _train(name, "ours", clip)
    assert scales == want_scales and state == want_state
    assert scales[0] == 2.0**19 and min(scales) < max(scales)  # a skip backs off, good steps grow it
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        assert torch.equal(a, b)


@pytest.mark.parametrize("clip", [False, True], ids=["step", "unscale-clip-step"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_compiled_update_traces_the_scaler_and_steps_as_eager(name, clip):
    # Compiled, the scaler's calls are traced (no graph break of its own); the optimizer gets the scale and
    # found_inf (given once, filled in place: an attribute assigned inside the compiled region would reach a
    # torch optimizer as None) and the run equals GradScaler's eager run.
    torch._dynamo.reset()
    counters.clear()
    want, want_scales, _ = _train(name, "torch", clip)
    got, scales, _ = _train(name, "ours", clip, compiled=True)
    breaks = {k.splitlines()[0] for k in counters["graph_break"]}
    torch._dynamo.reset()
    assert breaks <= TORCH_OPTIM_BREAKS, breaks
    assert scales == want_scales
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_grad_scaler_itself_breaks_the_graph():
    # Why LossScaler exists: if torch.amp ever leaves Dynamo's skip list this fails, and GradScaler can serve
    # --compile-step again.
    torch._dynamo.reset()
    counters.clear()
    _train("lars", "torch", clip=False, compiled=True, steps=2)
    breaks = {k.splitlines()[0] for k in counters["graph_break"]}
    torch._dynamo.reset()
    assert "Attempted to inline function marked as skipped" in breaks, breaks


def test_no_host_read_in_a_step():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = make_optimizer(model, OptimConfig(optimizer="lamb", lr=0.01))
    scaler = LossScaler(opt)
    reads = _Reads()
    with reads:
        for clip in (False, True):
            scaler.scale(model(torch.randn(8, 4)).square().mean()).backward()
            if clip:
                scaler.unscale_(opt)
            scaler.step(opt)
            scaler.update()
    assert not {"_local_scalar_dense", "item", "is_nonzero"} & reads.names


def test_state_moves_between_grad_scaler_and_loss_scaler():
    opt = make_optimizer(torch.nn.Linear(4, 2), OptimConfig(optimizer="sgd", lr=0.1))
    theirs = torch.amp.GradScaler("cpu", init_scale=512.0, growth_factor=4.0, backoff_factor=0.25, growth_interval=7)
    theirs.scale(torch.ones(()))  # (GradScaler makes its state on first use)
    ours = LossScaler(opt)
    ours.load_state_dict(theirs.state_dict())
    assert ours.state_dict() == theirs.state_dict()
    ours._growth_tracker.fill_(3)
    ours._scale.fill_(128.0)
    back = torch.amp.GradScaler("cpu")
    back.load_state_dict(ours.state_dict())
    back.scale(torch.ones(()))
    assert back.state_dict() == ours.state_dict() == {"scale": 128.0, "growth_factor": 4.0, "backoff_factor": 0.25,
                                                       "growth_interval": 7, "_growth_tracker": 3}


def test_bad_use_is_refused_in_one_line():
    model = torch.nn.Linear(4, 2)
    plain = torch.optim.SGD(model.parameters(), lr=0.1)  # the foreach SGD: GradScaler's host-reading path
    with pytest.raises(TypeError, match="SGD does not; use torch.amp.GradScaler"):
        LossScaler(plain)
    opt = make_optimizer(model, OptimConfig(optimizer="lars", lr=0.1))
    for kw, what in ((dict(growth_factor=1.0), "growth_factor"), (dict(backoff_factor=1.0), "backoff_factor"),
                     (dict(growth_interval=0), "growth_interval")):
        with pytest.raises(ValueError, match=what):
            LossScaler(opt, **kw)
    scaler = LossScaler(opt)
    other = make_optimizer(model, OptimConfig(optimizer="lars", lr=0.1))
    with pytest.raises(ValueError, match="serves the optimizer it was built with"):
        scaler.step(other)
    model(torch.randn(2, 4)).sum().backward()
    scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match="already called since the last update"):
        scaler.unscale_(opt)
    with pytest.raises(ValueError, match="lacks scale, _growth_tracker"):
        scaler.load_state_dict({"growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2})
