"""Collaborative learning inside PyTorch Lightning.

    from collab_fast.integrations.lightning import CollabModule, ExportHead
    module = CollabModule(build("resnet32", "hier4", num_classes=10), lr=0.1)
    L.Trainer(max_epochs=10, callbacks=[ExportHead("head0.pth")]).fit(module, train_loader, val_loader)
    module = CollabModule.load_from_checkpoint(path)      # no arguments: the network's build is saved

`CollabModule` wraps any network answering the collaborative interface (`build`'s and `make_collaborative`'s:
logits [H, N, C], `num_heads`, `export_head`; a plain [N, C] network counts as one head). The training step
is fused_collab_loss on the batch's targets (class indices or [N, C] probabilities, so mixup/cutmix
collate functions work as they are); it logs the loss, each head's hard loss and accuracy as tensors
(Lightning reduces them at the epoch's end; nothing reads them back per step unless a progress bar shows
them). Validation and test count each head's and the ensemble's hits and head 0's cross-entropy as sums on
the device, reduced over every rank once at the epoch's end, so the logged top-1 is the whole set's under DDP
(not a mean of ranks' ratios; Lightning's DistributedSampler repeats a few samples where the set does not
divide by the ranks). `predict_step` returns head `predict_head`'s logits [N, C] (None: every head's,
[H, N, C]). The optimizer is SGD (momentum 0.9, no weight decay on norms and biases, as collab_fast.optim)
unless `optimizer` builds another from the parameters. The hyperparameters are saved in every checkpoint,
the network as its `build` arguments (a network from elsewhere: pass `net=` to load_from_checkpoint; a custom
`optimizer` is not saved). `ExportHead` writes one head's state dict when fitting ends (atomic; loads
strict into the plain network).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import torch

from collab_fast.checkpoint import save_atomic
from collab_fast.extras import require
from collab_fast.kernels.collab_loss import CollabLossParams, collab_loss
from collab_fast.models.heads import as_heads
from collab_fast.optim import OptimConfig, make_optimizer

L = require("lightning", "lightning", "collab_fast.integrations.lightning")

__all__ = ["CollabModule", "ExportHead"]


def _network(net) -> torch.nn.Module:
    if isinstance(net, torch.nn.Module):
        return net
    if isinstance(net, Mapping):  # build's keywords, as saved in a checkpoint's hyperparameters
        from collab_fast.models import build

        return build(**net)
    if net is None:
        raise TypeError("net is missing: this checkpoint's network was not built by collab_fast.models.build, so "
                        "its build was not saved; pass net=<the same network> to load_from_checkpoint")
    raise TypeError(f"net must be a torch.nn.Module (e.g. collab_fast.models.build(...)) or a dict of build's "
                    f"keywords, got {type(net).__name__}")


class CollabModule(L.LightningModule):
    def __init__(self, net: torch.nn.Module | Mapping | None, loss: CollabLossParams | Mapping | None = None,
                 lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 1e-4,
                 optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer] | None = None,
                 predict_head: int | None = 0):
        super().__init__()
        net = _network(net)
        if isinstance(loss, Mapping):  # fused_collab_loss's keywords
            loss = CollabLossParams(**loss)
        if loss is not None and not isinstance(loss, CollabLossParams):
            raise TypeError(f"loss must be a CollabLossParams (e.g. CollabLossParams(temperature=3.0)) or a dict of "
                            f"fused_collab_loss's keywords, got {type(loss).__name__}")
        if optimizer is not None and not callable(optimizer):
            raise TypeError(f"optimizer must be a callable net -> torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.num_heads = getattr(net, "num_heads", 1)
        if predict_head is not None and (isinstance(predict_head, bool) or not isinstance(predict_head, int)
                                         or not 0 <= predict_head < self.num_heads):
            raise ValueError(f"predict_head must be a head index in [0, {self.num_heads}) or None (every head), got "
                             f"{predict_head!r}")
        self.net, self.loss_params, self.make_optimizer = net, loss or CollabLossParams(), optimizer
        self.optim = OptimConfig(lr=lr, momentum=momentum, wd=weight_decay)
        self.predict_head = predict_head
        # Plain values only: a checkpoint's hyperparameters load under weights_only=True.
        self.save_hyperparameters(dict(
            net=getattr(net, "build_spec", None), loss=_plain(dataclasses.asdict(self.loss_params)), lr=lr,
            momentum=momentum, weight_decay=weight_decay, predict_head=predict_head))
        self._tally: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return as_heads(self.net(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss, stats = collab_loss(logits.float(), y, self.loss_params, return_stats=True)
        n = y.shape[0]
        self.log("train/loss", loss, batch_size=n)
        for h in range(self.num_heads):
            self.log(f"train/hard_head{h}", stats.hard[h], batch_size=n)
            self.log(f"train/acc_head{h}", stats.correct[h] / stats.num_valid.clamp(min=1), batch_size=n)
        return loss * getattr(self.net, "loss_factor", 1.0)

    # Evaluation: sums on the device per step, one reduction over the ranks per epoch.
    def _count(self, stage: str, batch) -> None:
        x, y = batch[0], batch[1]
        logits = self(x).float()
        both = torch.cat([logits, logits.mean(0, keepdim=True)])  # heads..., ensemble
        top = y.argmax(-1) if y.is_floating_point() else y  # [N, C] probabilities: their top class counts
        hits = (both.argmax(-1) == top).sum(1).double()
        ce = torch.nn.functional.cross_entropy(logits[0], y, reduction="sum").double().reshape(1)
        n = torch.full((1,), y.shape[0], dtype=torch.float64, device=hits.device)
        row = torch.cat([hits, ce, n])  # [H + 1 hits, ce sum, count]
        self._tally[stage] = row if stage not in self._tally else self._tally[stage] + row

    def _report(self, stage: str) -> None:
        row = self._tally.pop(stage, None)
        if row is None:
            return
        row = self.trainer.strategy.reduce(row, reduce_op="sum")  # every rank's sums: the whole set's
        n = row[-1].clamp(min=1)
        # Equal on every rank now; sync_dist only tells Lightning so (its mean of equal values is the value).
        for h in range(self.num_heads):
            self.log(f"{stage}/top1_head{h}", (100 * row[h] / n).float(), prog_bar=h == 0, sync_dist=True)
        self.log(f"{stage}/top1_ensemble", (100 * row[self.num_heads] / n).float(), sync_dist=True)
        self.log(f"{stage}/ce_head0", (row[-2] / n).float(), sync_dist=True)

    def validation_step(self, batch, batch_idx):
        self._count("val", batch)

    def on_validation_epoch_end(self) -> None:
        self._report("val")

    def test_step(self, batch, batch_idx):
        self._count("test", batch)

    def on_test_epoch_end(self) -> None:
        self._report("test")

    def predict_step(self, batch, batch_idx, dataloader_idx: int = 0) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch  # (x, y) or x alone
        logits = self(x)
        return logits if self.predict_head is None else logits[self.predict_head]

    def configure_optimizers(self):
        if self.make_optimizer is not None:
            return self.make_optimizer(self.net)
        # Lightning unscales and clips the gradients itself (gradient_clip_val) and refuses optimizers that
        # unscale internally, as torch's fused SGD does: foreach SGD then.
        clip = getattr(self._trainer, "gradient_clip_val", None) if self._trainer is not None else None
        return make_optimizer(self.net, self.optim, fused=not clip)

    def export_head(self, k: int = 0) -> torch.nn.Module:
        return self.net.export_head(k)


def _plain(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


class ExportHead(L.Callback):
    """Writes head `head` of the module's network as a plain state dict at the end of fitting (rank 0)."""

    def __init__(self, path: str, head: int = 0):
        self.path, self.head = path, head

    def on_fit_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            save_atomic(pl_module.export_head(self.head).state_dict(), self.path)
