"""collab_fast.integrations.lightning: a tiny collaborative network trained by Lightning on CPU, exported."""

from pathlib import Path

import pytest
import torch

L = pytest.importorskip("lightning", reason="Lightning is the lightning extra (CI stage 5 installs it)")

from collab_fast.integrations.lightning import CollabModule, ExportHead  # noqa: E402
from collab_fast.models import build  # noqa: E402


def _loader(n=64, seed=0, probs=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=g)
    y = (x[:, 0].mean((1, 2)) > 0).long() + 2 * (x[:, 1].mean((1, 2)) > 0).long()  # 4 learnable classes
    t = torch.nn.functional.one_hot(y, 10).float() if probs else y
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, t), batch_size=16)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_fit_logs_per_head_metrics_and_exports_head0(tmp_path, precision):
    torch.manual_seed(0)
    module = CollabModule(build("resnet32", "ilr2", num_classes=10), lr=0.05)
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", devices=1, precision=precision, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[ExportHead(str(tmp_path / "head0.pth"))], default_root_dir=str(tmp_path))
    val = _loader(32, seed=1)
    trainer.validate(module, val, verbose=False)
    before = trainer.callback_metrics["val/ce_head0"].item()
    trainer.fit(module, _loader(), val)
    m = trainer.callback_metrics
    assert {"train/loss", "train/acc_head0", "train/acc_head1", "val/top1_head1", "val/top1_ensemble"} <= set(m)
    assert m["val/ce_head0"].item() < before  # it learnt
    plain = build("resnet32", "single", num_classes=10)
    plain.load_state_dict(torch.load(tmp_path / "head0.pth", weights_only=True), strict=True)
    x = next(iter(val))[0]
    module.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(x), module(x)[0])


def test_probability_targets_and_a_custom_optimizer(tmp_path):
    module = CollabModule(build("resnet32", "hier4", num_classes=10),
                          optimizer=lambda net: torch.optim.AdamW(net.parameters(), lr=1e-3))
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(module, _loader(probs=True))
    assert isinstance(trainer.optimizers[0], torch.optim.AdamW) and module.num_heads == 4
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_gradient_clipping_under_mixed_precision_with_the_default_optimizer(tmp_path, precision):
    # Lightning clips itself and refuses optimizers that unscale internally (torch's fused SGD): with
    # gradient_clip_val the module builds foreach SGD
    module = CollabModule(build("resnet32", "ilr2", num_classes=10), lr=0.05)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", precision=precision, gradient_clip_val=1.0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path))
    trainer.fit(module, _loader())
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_probability_targets_in_validation(tmp_path):
    module = CollabModule(build("resnet32", "ilr2", num_classes=10))
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(module, _loader(probs=True))
    trainer.validate(module, _loader(32, seed=1, probs=True), verbose=False)
    m = trainer.callback_metrics
    assert 0 <= m["val/top1_head0"].item() <= 100 and torch.isfinite(m["val/ce_head0"])


def test_wrong_argument_types_are_one_line():
    from collab_fast.kernels.collab_loss import CollabLossParams

    net = build("resnet32", "ilr2", num_classes=10)
    with pytest.raises(TypeError, match="loss must be a CollabLossParams .* got str"):
        CollabModule(net, loss="kl")
    with pytest.raises(TypeError, match="net must be a torch.nn.Module"):
        CollabModule("resnet32")
    with pytest.raises(TypeError, match="optimizer must be a callable"):
        CollabModule(net, optimizer="sgd")
    assert CollabModule(net, loss={"temperature": 3.0}).loss_params == CollabLossParams(temperature=3.0)


_DDP = """
import sys, torch, lightning as L
from collab_fast.integrations.lightning import CollabModule

class Fixed(torch.nn.Module):  # two heads whose logits are the input: the hits are set by the data
    num_heads = 2
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
    def forward(self, x):
        return torch.stack([x * self.w, x * self.w])

# 20 samples; Lightning's DistributedSampler gives rank r the indices r, r + 2, ...: 2 of rank 0's 10 are
# right, 4 of rank 1's: 20% and 40% per rank, 30% on the whole set.
right = {0, 2, 1, 3, 5, 7}
x = torch.nn.functional.one_hot(torch.arange(20) % 5, 5).float()
y = torch.tensor([i % 5 if i in right else (i + 1) % 5 for i in range(20)])
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False,
                    enable_model_summary=False, default_root_dir=sys.argv[1])
module = CollabModule(Fixed())
trainer.validate(module, loader, verbose=False)
v = dict(trainer.callback_metrics)
trainer.test(module, loader, verbose=False)
t = trainer.callback_metrics
# a file per rank: two processes printing to one pipe interleave their lines
with open(f"{sys.argv[1]}/rank{trainer.global_rank}.txt", "w") as f:
    print("RANK", trainer.global_rank, float(v["val/top1_head0"]), float(v["val/top1_ensemble"]),
          float(t["test/top1_head1"]), float(v["val/ce_head0"]), file=f)
"""


def test_evaluation_metrics_are_the_whole_sets_under_ddp(tmp_path):
    # Two CPU processes (gloo): each rank logs the top-1 of the whole set, not its own shard's.
    import os
    import subprocess
    import sys

    script = tmp_path / "ddp.py"
    script.write_text(_DDP)
    res = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=600,
                         cwd=tmp_path, env=dict(os.environ, PYTHONWARNINGS="ignore", PYTHONPATH=os.pathsep.join(
                             [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])))
    assert res.returncode == 0, res.stderr[-3000:]
    rows = sorted((tmp_path / f"rank{r}.txt").read_text().split()[1:] for r in (0, 1)
                  if (tmp_path / f"rank{r}.txt").exists())
    assert [r[0] for r in rows] == ["0", "1"], res.stdout + res.stderr[-2000:]
    right = {0, 2, 1, 3, 5, 7}
    x = torch.nn.functional.one_hot(torch.arange(20) % 5, 5).float()
    y = torch.tensor([i % 5 if i in right else (i + 1) % 5 for i in range(20)])
    ce = torch.nn.functional.cross_entropy(x, y).item()
    for r in rows:
        assert [float(v) for v in r[1:4]] == [30.0, 30.0, 30.0], rows
        assert float(r[4]) == pytest.approx(ce, rel=1e-6)


def test_test_and_predict_steps(tmp_path):
    torch.manual_seed(0)
    module = CollabModule(build("resnet32", "ilr2", num_classes=10))
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    data = _loader(32, seed=1)
    (out,) = trainer.test(module, data, verbose=False)
    module.eval()
    with torch.no_grad():
        logits = torch.cat([module(x) for x, _ in data], 1)
    y = torch.cat([t for _, t in data])
    for h in range(2):
        assert out[f"test/top1_head{h}"] == pytest.approx(100 * (logits[h].argmax(-1) == y).float().mean().item())
    assert out["test/ce_head0"] == pytest.approx(torch.nn.functional.cross_entropy(logits[0], y).item(), rel=1e-5)
    preds = trainer.predict(module, data)
    torch.testing.assert_close(torch.cat(preds), logits[0])
    module.predict_head = None
    inputs = torch.utils.data.DataLoader(torch.cat([x for x, _ in data]), batch_size=16)  # batches of inputs alone
    preds = trainer.predict(module, inputs)  # every head
    torch.testing.assert_close(torch.cat(preds, 1), logits)


def test_load_from_checkpoint_needs_no_arguments(tmp_path):
    torch.manual_seed(0)
    module = CollabModule(build("resnet32", "hier4", num_classes=10, splits=["layer1", "layer2"]),
                          loss={"temperature": 3.0, "label_smoothing": 0.1}, lr=0.05, predict_head=1)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(module, _loader())
    path = trainer.checkpoint_callback.best_model_path
    assert torch.load(path, weights_only=True)["hyper_parameters"]["net"]["arch"] == "resnet32"
    back = CollabModule.load_from_checkpoint(path)
    assert back.loss_params == module.loss_params and back.optim.lr == 0.05 and back.predict_head == 1
    assert back.net.splits == module.net.splits and back.num_heads == 4
    x = next(iter(_loader()))[0]
    module.eval(), back.eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x), module(x))
    # a network from elsewhere: its build is unknown, said in one line; given again, it loads
    plain = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 10))
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path / "plain"))
    trainer.fit(CollabModule(plain), _loader())
    path = trainer.checkpoint_callback.best_model_path
    with pytest.raises(TypeError, match="net is missing: .* pass net=<the same network> to load_from_checkpoint"):
        CollabModule.load_from_checkpoint(path)
    back = CollabModule.load_from_checkpoint(path, net=torch.nn.Sequential(torch.nn.Flatten(),
                                                                           torch.nn.Linear(3 * 16 * 16, 10)))
    torch.testing.assert_close(back.net[1].weight, plain[1].weight)
