"""--cuda-graphs: the captured step. Without a GPU the capture is rehearsed on OpTape, which freezes what a CUDA
graph freezes (the ops, the tensors they read and write, every Python number baked into them), so a trainer
that reads anything per step from Python instead of device memory trains differently from eager here too."""

import json

import pytest
import torch
from conftest import CPU_DIGITS

from collab_fast import train
from collab_fast.checkpoint import load_checkpoint
from collab_fast.graphs import CapturedStep, OpTape, warmup_steps
from collab_fast.metrics import Meter
from collab_fast.models import ModelConfig
from collab_fast.step import Step

BASE = [*CPU_DIGITS, "-b", "32", "--log-every", "3", "--progress", "off", "--image-size", "16", "--max-steps", "9"]

RECIPES = {  # every optimizer; what changes per step (warm-up, cosine, the soft ramp); the step's options
    "sgd": ("--pattern", "ilr2", "--soft-ramp", "1", "--warmup-epochs", "0.2", "--accum-steps", "2",
            "--model-ema", "0.9"),
    "adamw": ("--pattern", "hier4", "--opt", "adamw", "--clip-grad", "1", "--warmup-epochs", "0.2", "--mixup", "0.2",
              "--cutmix", "1"),  # the batch transform runs outside the graph: its [N, C] targets copied in
    "lamb": ("--pattern", "single", "--opt", "lamb", "--skip-nonfinite", "--schedule", "cosine", "--epochs", "1",
             "--model-ema", "0.5"),
    "lars": ("--pattern", "ilr2", "--opt", "lars", "--amp", "fp16", "--clip-grad", "2", "--warmup-epochs", "0.2",
             "-b", "8"),  # fp16 convolutions are slow on CPU: a smaller batch
}


def _losses(out):
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def _train(tmp_path, name, *flags):
    out = tmp_path / name
    assert train.main([*BASE, "--output", str(out), *flags]) == 0
    ckpt = load_checkpoint(out / "last.pt")
    return ckpt, _losses(out)


def _same(a: dict, b: dict, tol: float = 0.0):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=tol, rtol=tol, msg=k)


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_captured_step_trains_as_eager_does(tmp_path, recipe, capsys):
    # 3 eager warm-up steps, the capture on the 4th batch, then 5 replays: the LR and the soft factor change at
    # every step, the EMA and the meter are inside the graph. Weights, EMA, optimizer state and logged losses
    # equal eager's (AdamW: its LR a tensor under capture, a float in eager: float32 rounding).
    captured, losses = _train(tmp_path, "captured", "--cuda-graphs", *RECIPES[recipe])
    assert "captured in an op tape" in capsys.readouterr().out
    eager, want = _train(tmp_path, "eager", *RECIPES[recipe])
    tol = 1e-6 if recipe == "adamw" else 0.0
    _same(captured["model"], eager["model"], tol)
    if "ema" in eager:
        _same(captured["ema"], eager["ema"], tol)
    assert len(losses) == 3 and losses == pytest.approx(want, rel=1e-6 if tol else 0)


def test_a_captured_run_resumes_exactly(tmp_path):
    # 5 steps, then a second process resumes to 9 (its own warm-up and capture on the state it loaded): the weights,
    # EMA and optimizer state of one 9-step captured run.
    flags = ("--cuda-graphs", "--pattern", "ilr2", "--warmup-epochs", "0.2", "--model-ema", "0.9")
    whole, _ = _train(tmp_path, "whole", *flags)
    out = tmp_path / "parts"
    assert train.main([*BASE, "--output", str(out), *flags, "--max-steps", "5"]) == 0
    assert train.main([*BASE, "--output", str(out), *flags, "--resume", "auto"]) == 0
    parts = load_checkpoint(out / "last.pt")
    _same(parts["model"], whole["model"])
    _same(parts["ema"], whole["ema"])
    a, b = parts["optimizer"]["state"], whole["optimizer"]["state"]
    assert a.keys() == b.keys() and all(torch.equal(a[k]["momentum_buffer"], b[k]["momentum_buffer"]) for k in a)


def test_a_python_number_inside_the_step_is_frozen_at_the_capture(tmp_path, monkeypatch):
    # The control that shows the test above can fail: an LR handed to the optimizer as a Python float (as the
    # eager step does) is baked into the captured update, so the warm-up's LR ramp stops at the capture.
    def float_lr(self, lr):
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    flags = ("--pattern", "single", "--warmup-epochs", "0.2")
    eager, _ = _train(tmp_path, "eager", *flags)
    monkeypatch.setattr(Step, "set_lr", float_lr)
    frozen, _ = _train(tmp_path, "frozen", "--cuda-graphs", *flags)
    diff = max((frozen["model"][k].double() - eager["model"][k].double()).abs().max().item() for k in eager["model"])
    assert diff > 1e-4


def test_the_tape_replays_ops_with_new_values_and_refuses_a_host_read():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    x = torch.tensor([3.0, 4.0])
    total = torch.zeros(())
    tape = OpTape()
    with tape.capture():
        y = (w * x).sum()  # out-of-place: refilled at every replay
        y.backward()
        with torch.no_grad():
            w.sub_(0.5 * w.grad)  # in place: re-run
            total.add_(y.detach())
    assert y.item() == 11 and w.tolist() == [-0.5, 0.0] and total.item() == 11
    x.copy_(torch.tensor([1.0, 1.0]))
    tape.replay()  # y = -0.5 + 0; the gradient is x (the same tensor object, refilled)
    assert y.item() == -0.5 and w.grad.tolist() == [1.0, 1.0] and w.tolist() == [-1.0, -0.5] and total.item() == 10.5
    with pytest.raises(RuntimeError, match="reads a device value on the host inside the captured step"):
        with OpTape().capture():
            float(x.sum())
    with pytest.raises(RuntimeError, match="a tensor made from Python data inside the captured step"):
        with OpTape().capture():
            x.add_(torch.tensor(2.0))


class _Tiny:
    """A Step-shaped callable (what CapturedStep needs of Step) around a linear model and fused SGD."""

    def __init__(self):
        torch.manual_seed(0)
        self.net = torch.nn.Linear(4, 3)
        self.lr = torch.tensor(0.1)
        self.optimizer = torch.optim.SGD(self.net.parameters(), lr=self.lr, fused=True)
        self.ddp, self.calls, self.bad = None, 0, torch.zeros(())

    def set_lr(self, lr):
        self.lr.fill_(lr)

    def __call__(self, x, y, meter=None):
        self.calls += 1
        loss = torch.nn.functional.cross_entropy(self.net(x), y)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


def test_warm_up_capture_replay_and_one_shape():
    step = _Tiny()
    captured = CapturedStep(step, warmup=2)
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    for i in range(5):
        captured(x, y)
        assert captured.captured == (i >= 2)
    assert step.calls == 3  # 2 warm-up steps and the recording; the last 2 steps were replays
    assert warmup_steps(ddp=True) == 11 and warmup_steps(ddp=False) == 3
    with pytest.raises(ValueError, match=r"--cuda-graphs: a batch of images \(5, 4\) .* differs from the captured "
                                         r"\(6, 4\)"):
        captured(x[:5], y[:5])
    with pytest.raises(RuntimeError, match="the meter differs"):
        captured(x, y, Meter(1, torch.device("cpu")))
    step.lr = None
    with pytest.raises(ValueError, match="learning rate on the device"):
        CapturedStep(step)


def test_meter_reset_keeps_its_tensors():
    meter = Meter(2, torch.device("cpu"))
    held = [meter.loss, meter.hard, meter.count]
    meter.hard += 3
    meter.reset()
    assert [meter.loss, meter.hard, meter.count] == held and meter.hard.tolist() == [0.0, 0.0]
    assert all(a is b for a, b in zip([meter.loss, meter.hard, meter.count], held))


@pytest.mark.parametrize("flag", ["compile", "compile_step"])
def test_without_cuda_the_rehearsal_refuses_compiled_code_and_several_processes(flag):
    cfg = ModelConfig(arch="resnet32", cuda_graphs=True, **{flag: True})
    with pytest.raises(ValueError, match=f"--cuda-graphs with --{flag.replace('_', '-')} needs CUDA"):
        cfg.check_capture(cuda=False, world=1)
    cfg.check_capture(cuda=True, world=1)  # on a GPU the two compose
    with pytest.raises(ValueError, match="under torchrun needs CUDA"):
        ModelConfig(arch="resnet32", cuda_graphs=True).check_capture(cuda=False, world=2)
    ModelConfig(arch="resnet32").check_capture(cuda=False, world=2)


def test_the_trainer_refuses_the_rehearsal_with_compile_in_one_line(tmp_path, capsys):
    assert train.main([*BASE, "--output", str(tmp_path / "x"), "--cuda-graphs", "--compile"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --cuda-graphs with --compile needs CUDA")
