"""collab_fast.integrations.lightning: a tiny collaborative network trained by Lightning on CPU, exported."""

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
