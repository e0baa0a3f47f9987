"""The training step: --compile-step (the whole step compiled, nothing recompiled between steps, the same
numbers as eager) and what changes per step held on the device (the learning rate, the soft ramp's factor)."""

import json

import pytest
import torch
from conftest import CPU_DIGITS
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

from collab_fast import train
from collab_fast.checkpoint import load_checkpoint
from collab_fast.kernels.collab_loss import collab_loss
from collab_fast.models import build
from collab_fast.step import Step

BASE = [*CPU_DIGITS, "-b", "32", "--log-every", "100", "--progress", "off", "--image-size", "16"]

# Graph breaks that PyTorch puts there itself: the backward (compiled autograd takes over from it),
# torch.optim's no_grad boundary around every step, and its fused SGD/AdamW (already one fused kernel each,
# marked not to be traced). Any other break is a regression.
EXPECTED_BREAKS = ("Unsupported Tensor.backward() call", "Call to `torch._dynamo.graph_break()`",
                   "Skip calling `torch.compiler.disable()`d function")


def _compiled_run(tmp_path, monkeypatch, *flags, steps=20):
    """Trains `steps` steps with --compile-step through a counting backend (aot_eager: the graphs Dynamo and
    AOTAutograd make, without Inductor's code generation, which takes minutes on 2 cores); returns (output
    folder, frames compiled after each step, compiled-autograd captures after each step)."""
    torch._dynamo.reset()
    counters.clear()
    cnt = CompileCounterWithBackend("aot_eager")
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, backend=cnt))
    frames, captures = [], []
    call = Step.__call__

    def counted(self, *a, **k):
        out = call(self, *a, **k)
        frames.append(cnt.frame_count)
        captures.append(counters["compiled_autograd"]["captures"])
        return out

    monkeypatch.setattr(Step, "__call__", counted)
    out = tmp_path / "compiled"
    assert train.main([*BASE, "--output", str(out), "--compile-step", "--max-steps", str(steps), *flags]) == 0
    monkeypatch.setattr(Step, "__call__", call)
    monkeypatch.setattr(torch, "compile", real)
    return out, frames, captures


RECIPES = {  # the schedules that change per step, the step's options; torch's fused optimizers and ours
    "sgd": ("--pattern", "ilr2", "--soft-ramp", "1", "--warmup-epochs", "0.2", "--accum-steps", "2",
            "--model-ema", "0.9"),
    "lamb": ("--pattern", "single", "--opt", "lamb", "--clip-grad", "1", "--skip-nonfinite", "--schedule", "cosine",
             "--epochs", "1"),
    # fp16: the loss scaler inside the compiled update (scaler.LossScaler; torch's GradScaler would be three
    # graph breaks, and the optimizer step outside the graph); fp16 convolutions are slow on CPU: batch 8
    "fp16": ("--pattern", "ilr2", "--opt", "lars", "--amp", "fp16", "--clip-grad", "2", "--soft-ramp", "1", "-b", "8"),
}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_compiled_step_compiles_once_over_20_steps_and_trains_as_eager_does(tmp_path, monkeypatch, recipe):
    # The LR (warm-up, cosine) and the soft factor change at every step: read from device tensors, they
    # change nothing Dynamo guards on. The first two steps may compile (the optimizer's state is created by
    # the first); after them nothing compiles again, the backward included (compiled autograd). The weights
    # after 20 steps are eager's from the same seed, to float32 rounding.
    out, frames, captures = _compiled_run(tmp_path, monkeypatch, *RECIPES[recipe])
    assert len(frames) == 20
    assert frames[1] == frames[-1] and captures[1] == captures[-1] >= 1, (frames, captures)
    breaks = {k.splitlines()[0] for k in counters["graph_break"]}
    assert breaks <= set(EXPECTED_BREAKS), breaks
    torch._dynamo.reset()
    eager = tmp_path / "eager"
    assert train.main([*BASE, "--output", str(eager), "--max-steps", "20", *RECIPES[recipe]]) == 0
    a, b = load_checkpoint(out / "last.pt")["model"], load_checkpoint(eager / "last.pt")["model"]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-3, msg=k)


@pytest.mark.slow
def test_compiled_step_skips_a_non_finite_step_as_eager_does(tmp_path, monkeypatch):
    # --skip-nonfinite under --compile-step: the first step's images are NaN. The optimizer (torch's fused
    # AdamW, whose step is a graph break of its own) must skip it on the device: it reads found_inf from the
    # tensor Step gave it once (a found_inf assigned inside the compiled update never reached it: the NaN
    # update ran and the model diverged). Both runs end with the same finite weights and one skipped step.
    flags = ("--pattern", "ilr2", "--opt", "adamw", "--skip-nonfinite", "--log-every", "3")

    def poisoned(run):
        real, calls = Step.__call__, {"n": 0}

        def call(self, x, y, meter=None):
            calls["n"] += 1
            return real(self, x * float("nan") if calls["n"] == 1 else x, y, meter)

        monkeypatch.setattr(Step, "__call__", call)
        try:
            return run()
        finally:
            monkeypatch.setattr(Step, "__call__", real)

    out, frames, _ = poisoned(lambda: _compiled_run(tmp_path, monkeypatch, *flags, steps=6))
    assert frames[1] == frames[-1], frames
    torch._dynamo.reset()
    eager = tmp_path / "eager"
    assert poisoned(lambda: train.main([*BASE, "--output", str(eager), "--max-steps", "6", *flags])) == 0
    for run in (out, eager):
        last = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["skipped_steps"] for r in last if r["kind"] == "train"][-1] == 1, run
    a, b = load_checkpoint(out / "last.pt")["model"], load_checkpoint(eager / "last.pt")["model"]
    for k in a:
        assert torch.isfinite(a[k].float()).all(), k
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-3, msg=k)


def test_compile_and_compile_step_are_one_or_the_other(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        train.main([*BASE, "--output", str(tmp_path / "x"), "--compile", "--compile-step"])
    assert exit_.value.code == 2
    assert "--compile and --compile-step: give one" in capsys.readouterr().err


def _step(**kw):
    net = build("resnet32", "ilr2", num_classes=10, in_chans=1)
    cfg = train.TrainConfig.from_flags("digits", **kw)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    return Step(cfg, net, net, opt), opt


def test_compiled_step_shares_one_lr_tensor_and_keeps_it_after_a_state_load():
    step, opt = _step(compile_step=True)
    step.set_lr(0.05)
    assert all(g["lr"] is step.lr for g in opt.param_groups) and float(step.lr) == pytest.approx(0.05)
    opt.load_state_dict(opt.state_dict() | {"param_groups": [dict(g, lr=0.3) for g in opt.state_dict()["param_groups"]]})
    step.set_lr(0.02)  # a resumed run: the loaded groups hold floats again
    assert all(g["lr"] is step.lr for g in opt.param_groups) and float(step.lr) == pytest.approx(0.02)
    eager, opt = _step()
    eager.set_lr(0.05)
    assert eager.lr is None and [g["lr"] for g in opt.param_groups] == [0.05]


def test_soft_ramp_factor_lives_on_the_device_and_reaches_the_loss():
    step, _ = _step(soft_ramp=1.0)
    assert step.soft is not None and step.soft.device.type == "cpu" and float(step.soft) == 1.0
    torch.manual_seed(0)
    x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,))
    step.net.eval()  # no batch-norm update: both calls see the same network
    losses = []
    for f in (1.0, 0.0):
        step.set_soft_factor(f)
        logits = step.model(x)
        losses.append(collab_loss(logits, y, step.base, soft_factor=step.soft))
    hard = collab_loss(step.model(x), y, step.base.with_soft_factor(0.0))
    torch.testing.assert_close(losses[1], hard)
    assert losses[0] > losses[1]
    assert _step()[0].soft is None  # no ramp: no factor at all (the kernel's plain path)
