"""Collaborative learning inside PyTorch Lightning.

    from collab_fast.integrations.lightning import CollabModule, ExportHead
    module = CollabModule(build("resnet32", "hier4", num_classes=10), lr=0.1)
    L.Trainer(max_epochs=10, callbacks=[ExportHead("head0.pth")]).fit(module, train_loader, val_loader)

`CollabModule` wraps any network answering the collaborative interface (`build`'s and `make_collaborative`'s:
logits [H, N, C], `num_heads`, `export_head`; a plain [N, C] network counts as one head). The training step
is fused_collab_loss on the batch's targets (class indices or [N, C] probabilities, so mixup/cutmix
collate functions work as they are); it logs the loss, each head's hard loss and accuracy as tensors
(Lightning reduces them at the epoch's end; nothing reads them back per step unless a progress bar shows
them). Validation logs each head's top-1, the ensemble's and head 0's cross-entropy. The optimizer is
SGD (momentum 0.9, no weight decay on norms and biases, as collab_fast.optim) unless `optimizer` builds
another from the parameters. `ExportHead` writes one head's state dict when fitting ends (atomic; loads
strict into the plain network).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from collab_fast.checkpoint import save_atomic
from collab_fast.extras import require
from collab_fast.kernels.collab_loss import CollabLossParams, collab_loss
from collab_fast.optim import OptimConfig, make_optimizer

L = require("lightning", "lightning", "collab_fast.integrations.lightning")

__all__ = ["CollabModule", "ExportHead"]


def _heads(logits: torch.Tensor) -> torch.Tensor:
    return logits if logits.dim() == 3 else logits.unsqueeze(0)


class CollabModule(L.LightningModule):
    def __init__(self, net: torch.nn.Module, loss: CollabLossParams | None = None, lr: float = 0.1,
                 momentum: float = 0.9, weight_decay: float = 1e-4,
                 optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer] | None = None):
        super().__init__()
        if not isinstance(net, torch.nn.Module):
            raise TypeError(f"net must be a torch.nn.Module (e.g. collab_fast.models.build(...)), got {type(net).__name__}")
        if isinstance(loss, dict):  # fused_collab_loss's keywords
            loss = CollabLossParams(**loss)
        if loss is not None and not isinstance(loss, CollabLossParams):
            raise TypeError(f"loss must be a CollabLossParams (e.g. CollabLossParams(temperature=3.0)) or a dict of "
                            f"fused_collab_loss's keywords, got {type(loss).__name__}")
        if optimizer is not None and not callable(optimizer):
            raise TypeError(f"optimizer must be a callable net -> torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.net, self.loss_params, self.make_optimizer = net, loss or CollabLossParams(), optimizer
        self.optim = OptimConfig(lr=lr, momentum=momentum, wd=weight_decay)
        self.num_heads = getattr(net, "num_heads", 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _heads(self.net(x))

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

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x).float()
        both = torch.cat([logits, logits.mean(0, keepdim=True)])  # heads..., ensemble
        top = y.argmax(-1) if y.is_floating_point() else y  # [N, C] probabilities: their top class counts
        hit = (both.argmax(-1) == top).float().mean(1)
        n = y.shape[0]
        self.log("val/ce_head0", torch.nn.functional.cross_entropy(logits[0], y), batch_size=n)
        for h in range(self.num_heads):
            self.log(f"val/top1_head{h}", 100 * hit[h], batch_size=n, prog_bar=h == 0)
        self.log("val/top1_ensemble", 100 * hit[-1], batch_size=n)

    def configure_optimizers(self):
        if self.make_optimizer is not None:
            return self.make_optimizer(self.net)
        # Lightning unscales and clips the gradients itself (gradient_clip_val) and refuses optimizers that
        # unscale internally, as torch's fused SGD does: foreach SGD then.
        clip = getattr(self._trainer, "gradient_clip_val", None) if self._trainer is not None else None
        return make_optimizer(self.net, self.optim, fused=not clip)

    def export_head(self, k: int = 0) -> torch.nn.Module:
        return self.net.export_head(k)


class ExportHead(L.Callback):
    """Writes head `head` of the module's network as a plain state dict at the end of fitting (rank 0)."""

    def __init__(self, path: str, head: int = 0):
        self.path, self.head = path, head

    def on_fit_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            save_atomic(pl_module.export_head(self.head).state_dict(), self.path)
