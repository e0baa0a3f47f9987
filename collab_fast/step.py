"""One optimizer step of collaborative training: forward (autocast), the fused collaborative loss, backward
(gradient accumulation over micro-batches, DDP's all-reduce once), clipping and the update, with no host
sync; a non-finite step is agreed across ranks and skipped on the device (--skip-nonfinite) or reported."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from collab_fast.config import TrainConfig
from collab_fast.distributed import Dist
from collab_fast.kernels.collab_loss import collab_loss
from collab_fast.metrics import Meter
from collab_fast.models import as_heads

__all__ = ["AMP_DTYPES", "Step"]

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Step:
    """One optimizer step (forward, fused loss, backward, update) with no host sync. `model` is what runs
    (maybe DDP- or compile-wrapped), `net` the bare model (num_heads, loss_factor, buffers)."""

    def __init__(self, cfg: TrainConfig, model, net, optimizer, scaler=None, proc: Dist | None = None):
        self.model, self.net, self.optimizer, self.scaler = model, net, optimizer, scaler
        self.proc = proc or Dist()
        # the DDP wrapper, also under torch.compile's (whose isinstance is not DDP): no_sync lives there
        inner = getattr(model, "_orig_mod", model)
        self.ddp = inner if isinstance(inner, torch.nn.parallel.DistributedDataParallel) else None
        self.base = cfg.loss
        self.params = self.base  # the base settings, the soft coefficient scaled by --soft-ramp
        self.amp = AMP_DTYPES.get(cfg.optim.amp)
        self.accum = cfg.optim.accum_steps
        self.scale = net.loss_factor / cfg.optim.accum_steps
        self.clip = cfg.optim.clip_grad
        # --skip-nonfinite: a skipped step must leave the model exactly as it was, and its forward has
        # already updated the batch-norm statistics: those buffers are put back on the device.
        self.buffers = [b for b in net.buffers()] if cfg.optim.skip_nonfinite else None

    def set_soft_factor(self, factor: float) -> None:
        self.params = self.base if factor == 1.0 else self.base.with_soft_factor(factor)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, meter: Meter | None = None) -> torch.Tensor:
        """Returns the step's loss on the device (the sum over micro-batches of each one's mean)."""
        saved = [b.clone() for b in self.buffers] if self.buffers is not None else None
        step_loss = torch.zeros((), device=x.device)
        for k in range(self.accum):
            xk, yk = (x, y) if self.accum == 1 else (x[k :: self.accum], y[k :: self.accum])
            # DDP: all-reduce the gradients once, after the last micro-batch (no_sync covers forward and backward)
            sync = k == self.accum - 1 or self.ddp is None
            with contextlib.nullcontext() if sync else self.ddp.no_sync():
                with torch.autocast(x.device.type, dtype=self.amp, enabled=self.amp is not None):
                    logits = as_heads(self.model(xk))
                loss, stats = collab_loss(logits, yk, self.params, return_stats=True)
                if meter is not None:
                    meter.add(loss, stats)
                step_loss += loss.detach()
                scaled = loss * self.scale
                self.scaler.scale(scaled).backward() if self.scaler is not None else scaled.backward()
        # Non-finite on any rank is non-finite on all: one tiny all-reduce on the device (no host sync), so
        # every rank skips (or stops at) the same steps.
        self.bad = self.proc.all_reduce((~torch.isfinite(step_loss)).float(), op=dist.ReduceOp.MAX)
        if saved is not None:
            bad = self.bad.bool()
            self.optimizer.found_inf = self.bad  # every optimizer of make_optimizer skips the update on the device
            with torch.no_grad():
                for b, s in zip(self.buffers, saved):
                    b.copy_(torch.where(bad, s, b))
        if self.clip is not None:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)  # clip the true gradients; step() then does not unscale again
            # the norm stays on the device: no sync (and no error_if_nonfinite, which would read it)
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.clip, foreach=True)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return step_loss
