"""One optimizer step of collaborative training: forward (autocast), the fused collaborative loss, backward
(gradient accumulation over micro-batches, DDP's all-reduce once), clipping and the update, with no host
sync; a non-finite step is agreed across ranks and skipped on the device (--skip-nonfinite) or reported.

The update includes the weights' moving average (--model-ema), so it is compiled and captured with the rest.

--compile-step compiles the whole step (torch.compile with compiled autograd for the backward); --cuda-graphs
captures it (graphs.py). What changes from step to step lives in device tensors that the step reads (the
learning rate; --soft-ramp's factor, which the loss kernel loads), so no value the compiler guards on changes
(the step compiles once) and no value a graph would freeze changes (the step is captured once)."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from collab_fast.config import TrainConfig
from collab_fast.distributed import Dist
from collab_fast.ema import ModelEMA
from collab_fast.kernels.collab_loss import collab_loss
from collab_fast.metrics import Meter
from collab_fast.models import as_heads

__all__ = ["AMP_DTYPES", "Step"]

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Step:
    """One optimizer step (forward, fused loss, backward, update, EMA) with no host sync. `model` is what runs
    (maybe DDP- or compile-wrapped), `net` the bare model (num_heads, loss_factor, buffers)."""

    def __init__(self, cfg: TrainConfig, model, net, optimizer, scaler=None, proc: Dist | None = None,
                 ema: ModelEMA | None = None):
        self.model, self.net, self.optimizer, self.scaler, self.ema = model, net, optimizer, scaler, ema
        self.proc = proc or Dist()
        # the DDP wrapper, also under torch.compile's (whose isinstance is not DDP): no_sync lives there
        inner = getattr(model, "_orig_mod", model)
        self.ddp = inner if isinstance(inner, torch.nn.parallel.DistributedDataParallel) else None
        self.base = cfg.loss
        self.amp = AMP_DTYPES.get(cfg.optim.amp)
        self.accum = cfg.optim.accum_steps
        self.scale = net.loss_factor / cfg.optim.accum_steps
        self.clip = cfg.optim.clip_grad
        # --skip-nonfinite: a skipped step must leave the model exactly as it was, and its forward has
        # already updated the batch-norm statistics: those buffers are put back on the device.
        self.buffers = [b for b in net.buffers()] if cfg.optim.skip_nonfinite else None
        device = next(net.parameters()).device
        # 1 where the step's loss was not finite on some rank; rewritten in place by every step. --skip-nonfinite:
        # the optimizer skips on it, given once here and not assigned in the step: under --compile-step a
        # found_inf assigned inside the compiled update never reached torch's fused AdamW/SGD (torch 2.13), and
        # the non-finite update ran
        self.bad = torch.zeros((), device=device)
        if cfg.optim.skip_nonfinite:
            optimizer.found_inf = self.bad
        # --soft-ramp: the factor on the soft coefficient, read by the loss on the device at each step
        self.soft = torch.ones((), device=device) if cfg.optim.soft_ramp > 0 else None
        # --compile-step, --cuda-graphs: the learning rate as a device tensor shared by every parameter group
        self.lr = None
        if cfg.model.compile_step or cfg.model.cuda_graphs:
            self.lr = torch.tensor(float(optimizer.param_groups[0]["lr"]), device=device)
        # autocast's cast cache would hand a captured step the casts of the capture (PyTorch's CUDA graphs notes)
        self.cast_cache = not cfg.model.cuda_graphs
        self.micro, self.update = self._micro, self._update
        if cfg.model.compile_step:
            # Two compiled parts, each entered once a micro-batch / step: Dynamo gives up on a whole frame whose
            # loop holds a graph break (the backward is one: compiled autograd takes it from there), and DDP's
            # no_sync is a context manager it does not trace. The step's Python around them is a few calls.
            # compiled autograd (read when torch.compile wraps, not per call): the backward inside the compiled
            # micro-batch is compiled too, a graph of its own instead of eager autograd
            with torch._dynamo.config.patch(compiled_autograd=True):
                self.micro = torch.compile(self._micro)
            self.update = torch.compile(self._update)

    def set_lr(self, lr: float) -> None:
        """The learning rate of the next steps: the groups' floats, or (--compile-step, --cuda-graphs) the tensor
        they share, filled on the device (a float would be a constant of the compiled step, a recompile at every
        change, and of a captured one, never changed)."""
        if self.lr is None:
            for g in self.optimizer.param_groups:
                g["lr"] = lr
            return
        self.lr.fill_(lr)
        for g in self.optimizer.param_groups:
            if g["lr"] is not self.lr:  # first call, or an optimizer state loaded since (resume)
                g["lr"] = self.lr

    def set_soft_factor(self, factor: float) -> None:
        """--soft-ramp: the soft coefficient's factor of the next steps (in place, on the device)."""
        self.soft.fill_(factor)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, meter: Meter | None = None) -> torch.Tensor:
        """Returns the step's loss on the device (the sum over micro-batches of each one's mean)."""
        if self.lr is None or self.ddp is None:
            return self._step(x, y, meter)
        # compiled autograd under DDP: the buckets' all-reduces run as the compiled backward's own reducer
        # (PyTorch's documented pairing; the C++ reducer's hooks cannot be traced)
        with torch._dynamo.config.patch(optimize_ddp="python_reducer"):
            return self._step(x, y, meter)

    def _step(self, x: torch.Tensor, y: torch.Tensor, meter: Meter | None) -> torch.Tensor:
        saved = [b.clone() for b in self.buffers] if self.buffers is not None else None
        step_loss = torch.zeros((), device=x.device)
        for k in range(self.accum):
            xk, yk = (x, y) if self.accum == 1 else (x[k :: self.accum], y[k :: self.accum])
            # DDP: all-reduce the gradients once, after the last micro-batch (no_sync covers forward and backward)
            sync = k == self.accum - 1 or self.ddp is None
            with contextlib.nullcontext() if sync else self.ddp.no_sync():
                step_loss += self.micro(xk, yk, meter)
        self.update(step_loss, saved)
        self.optimizer.zero_grad(set_to_none=True)  # outside the compiled update: Dynamo does not trace it
        return step_loss

    def _micro(self, x: torch.Tensor, y: torch.Tensor, meter: Meter | None) -> torch.Tensor:
        """Forward, loss and backward of one micro-batch; returns its loss (detached)."""
        with torch.autocast(x.device.type, dtype=self.amp, enabled=self.amp is not None,
                            cache_enabled=self.cast_cache):
            logits = as_heads(self.model(x))
        loss, stats = collab_loss(logits, y, self.base, return_stats=True, soft_factor=self.soft)
        if meter is not None:
            meter.add(loss, stats)
        scaled = loss * self.scale
        self.scaler.scale(scaled).backward() if self.scaler is not None else scaled.backward()
        return loss.detach()

    def _update(self, step_loss: torch.Tensor, saved: list[torch.Tensor] | None) -> None:
        """The non-finite agreement, the skip, clipping, the optimizer's update and the EMA."""
        # Non-finite on any rank is non-finite on all: one tiny all-reduce on the device (no host sync), so
        # every rank skips (or stops at) the same steps.
        self.bad.copy_(self.proc.all_reduce((~torch.isfinite(step_loss)).float(), op=dist.ReduceOp.MAX))
        if saved is not None:  # (the optimizer skips its update on self.bad: see __init__)
            bad = self.bad.bool()
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
        if self.ema is not None:
            self.ema.update(self.bad)  # a skipped step leaves the average as it was
