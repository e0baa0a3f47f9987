"""collab_fast.ema: the weights' moving average, its update, its skip, and the trainer's --model-ema."""

import json

import pytest
import torch
from conftest import CPU_ARCH, CPU_DIGITS

from collab_fast import train
from collab_fast.checkpoint import load_checkpoint
from collab_fast.ema import ModelEMA
from collab_fast.export import main as export_main
from collab_fast.models import build


def test_average_follows_the_formula_and_copies_integer_buffers():
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ema = ModelEMA(net, 0.9)
    want = {k: v.clone() for k, v in net.state_dict().items()}
    for _ in range(3):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        net(torch.randn(5, 3))  # BN statistics and the step count move
        ema.update()
        for k, v in net.state_dict().items():
            want[k] = 0.9 * want[k] + 0.1 * v if v.is_floating_point() else v.clone()
    for k, v in ema.state_dict().items():
        torch.testing.assert_close(v, want[k])
    assert int(ema.state_dict()["1.num_batches_tracked"]) == 3
    assert not any(p.requires_grad for p in ema.module.parameters()) and not ema.module.training


def test_a_skipped_step_leaves_the_average_and_bad_decays_are_refused():
    net = torch.nn.Linear(3, 2)
    ema = ModelEMA(net, 0.5)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(torch.tensor(1.0))
    assert all(torch.equal(v, before[k]) for k, v in ema.state_dict().items())
    ema.update(torch.tensor(0.0))
    torch.testing.assert_close(ema.module.weight, before["weight"] + 0.5)
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="--model-ema"):
            ModelEMA(net, bad)


BASE = [*CPU_DIGITS, "-b", "32", "--log-every", "1", "--pattern", "ilr2"]


def test_trainer_evaluates_saves_resumes_and_exports_the_average(tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main([*BASE, "--output", str(out), "--max-steps", "3", "--model-ema", "0.5"]) == 0
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r["kind"] == "eval"]
    assert evals and {"ema_top1", "ema_val_loss", "ema_top1_heads"} <= set(evals[-1])
    ckpt = load_checkpoint(out / "last.pt")
    assert set(ckpt["ema"]) == set(ckpt["model"])
    assert any(not torch.equal(ckpt["ema"][k], ckpt["model"][k]) for k in ckpt["model"] if "weight" in k)
    # resume continues the average from the checkpoint's, not from the weights
    assert train.main([*BASE, "--output", str(out), "--max-steps", "5", "--model-ema", "0.5", "--resume", "auto"]) == 0
    again = load_checkpoint(out / "last.pt")
    assert again["state"]["step"] == 5
    # every head exports from either
    assert export_main([str(out / "last.pt"), "--ema", "--head", "1", "-o", str(tmp_path / "h1.pth")]) == 0
    head = build(CPU_ARCH, "single", num_classes=10)
    head.load_state_dict(torch.load(tmp_path / "h1.pth", weights_only=True), strict=True)
    capsys.readouterr()
    plain = tmp_path / "plain"
    assert train.main([*BASE, "--output", str(plain), "--max-steps", "1"]) == 0
    assert "ema" not in load_checkpoint(plain / "last.pt")
    assert export_main([str(plain / "last.pt"), "--ema", "-o", str(tmp_path / "x.pth")]) == 2
    assert "holds no weight average" in capsys.readouterr().err


def test_an_update_is_a_few_multi_tensor_ops_whatever_the_number_of_layers():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    net = build("resnet32", "hier4", num_classes=10)  # 71 BatchNorm counters (shared trunk + 2 + 4 copies)
    ema = ModelEMA(net, 0.9)
    assert len(ema._copy_dst) > 50
    for skipped in (None, torch.tensor(0.0)):
        with Count() as c:
            ema.update(skipped)
        assert "aten.copy_" not in c.ops and len(c.ops) <= 6, c.ops
        assert c.ops.count("aten._foreach_copy_") == 1


def test_the_average_equals_timm_model_ema_v3():
    # timm's ModelEmaV3 at a constant decay (no warm-up): also a copy of the network at construction, so both
    # averages start from the initial weights (torch's AveragedModel copies at its first update instead).
    ema_mod = pytest.importorskip("timm.utils.model_ema", reason="needs timm (CI: the timm/torchvision stage)")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 5)).double()
    ours, theirs = ModelEMA(net, 0.9), ema_mod.ModelEmaV3(net, decay=0.9)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(4):
        loss = net(torch.randn(6, 3, 8, 8, dtype=torch.float64)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ours.update()
        theirs.update(net)
    want = theirs.module.state_dict()
    for k, v in ours.state_dict().items():
        torch.testing.assert_close(v, want[k], rtol=1e-12, atol=1e-12, msg=k)
