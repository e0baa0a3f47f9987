"""The fp16 loss scaler of a compiled step (--compile-step with --amp fp16).

torch.amp.GradScaler keeps its per-step state in Python dictionaries keyed by optimizer, and Dynamo declines
to trace it (torch.amp is on its skip list): under torch.compile each of its calls is a graph break, and the
optimizer step it makes runs outside the compiled update. `LossScaler` is the same dynamic loss scaling,
computed by the same ATen ops (`_amp_foreach_non_finite_check_and_unscale_`, `_amp_update_scale_`), with its
state in device tensors and one Python flag per step, so the whole update compiles as one graph and is
captured with it. Its defaults and its `state_dict` are GradScaler's: a checkpoint moves between the two.

The eager and captured steps keep torch's GradScaler; the trainer builds this one for --compile-step only.
It needs an optimizer that unscales and skips on the device (`_step_supports_amp_scaling`: torch's fused
SGD/AdamW, and every optimizer of collab_fast.optim), which GradScaler also hands its scale to.
"""

from __future__ import annotations

import torch

__all__ = ["LossScaler"]


class LossScaler:
    """Dynamic loss scaling on the device for one optimizer: `scale(loss)` before backward; `unscale_(optimizer)`
    where the true gradients are needed (clipping); `step(optimizer)` (skipped on the device when a gradient is
    inf or NaN); `update()` (the scale halves after a skipped step and doubles after `growth_interval` good
    ones in a row).

    The optimizer reads `grad_scale` and `found_inf` (torch's contract for `_step_supports_amp_scaling`).
    They are set here, once and outside any compiled code, to tensors that every step then fills in place:
    an attribute assigned on an optimizer inside a compiled region was seen to miss torch's fused SGD and
    AdamW under torch 2.13, whose step is a graph break of its own (they got None: no unscaling, no skip;
    tests/test_step.py's non-finite test fails that way on the old trainer)."""

    def __init__(self, optimizer: torch.optim.Optimizer, init_scale: float = 2.0**16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000):
        if not getattr(optimizer, "_step_supports_amp_scaling", False):
            raise TypeError(f"LossScaler needs an optimizer that unscales and skips on the device "
                            f"(_step_supports_amp_scaling), which {type(optimizer).__name__} does not; use "
                            "torch.amp.GradScaler")
        if not growth_factor > 1.0:
            raise ValueError(f"growth_factor must be > 1, got {growth_factor}")
        if not 0.0 < backoff_factor < 1.0:
            raise ValueError(f"backoff_factor must be in (0, 1), got {backoff_factor}")
        if growth_interval < 1:
            raise ValueError(f"growth_interval must be >= 1, got {growth_interval}")
        self.optimizer = optimizer
        self.device = next(p.device for g in optimizer.param_groups for p in g["params"])
        self.growth_factor, self.backoff_factor, self.growth_interval = growth_factor, backoff_factor, growth_interval
        f32 = dict(dtype=torch.float32, device=self.device)
        self._scale = torch.full((), float(init_scale), **f32)
        self._growth_tracker = torch.zeros((), dtype=torch.int32, device=self.device)
        self._found_inf = torch.zeros((), **f32)  # > 0: this step is skipped
        self._grad_scale = torch.ones((), **f32)  # what the optimizer divides by: the scale, or 1 after unscale_
        self._one = torch.ones((), **f32)
        self._unscaled = False  # unscale_ ran since the last update
        optimizer.grad_scale, optimizer.found_inf = self._grad_scale, self._found_inf

    def scale(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs * self._scale

    def get_scale(self) -> float:
        """The current scale (a host read: for logs and checkpoints, not for the step)."""
        return float(self._scale.item())

    def _check(self, inv_scale: torch.Tensor) -> None:
        """found_inf = whether any gradient is inf or NaN; the gradients multiplied by inv_scale in place."""
        self._found_inf.zero_()
        groups: dict[tuple, list[torch.Tensor]] = {}  # the op takes one device and dtype a list
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("LossScaler: sparse gradients are not supported; use torch.amp.GradScaler")
                groups.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
        for (device, _), grads in groups.items():
            if device == self.device:
                torch._amp_foreach_non_finite_check_and_unscale_(grads, self._found_inf, inv_scale)
            else:  # a model spread over devices: each device's check, summed where the scale lives
                found = torch.zeros((), dtype=torch.float32, device=device)
                torch._amp_foreach_non_finite_check_and_unscale_(grads, found, inv_scale.to(device))
                self._found_inf += found.to(self.device)

    def _own(self, optimizer: torch.optim.Optimizer, what: str) -> None:
        if optimizer is not self.optimizer:
            raise ValueError(f"LossScaler.{what}: this scaler serves the optimizer it was built with, not another")

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divides the gradients by the scale in place (and checks them), once a step."""
        self._own(optimizer, "unscale_")
        if self._unscaled:
            raise RuntimeError("LossScaler.unscale_() was already called since the last update()")
        self._check(self._scale.double().reciprocal().float())  # GradScaler's rounding of 1 / scale
        self._unscaled = True

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer's step: it divides by the scale (unless unscale_ ran) and skips when found_inf > 0,
        on the device."""
        self._own(optimizer, "step")
        if self._unscaled:
            self._grad_scale.fill_(1.0)
        else:
            self._check(self._one)  # the check alone: the optimizer divides
            self._grad_scale.copy_(self._scale)
        optimizer.step()

    def update(self) -> None:
        """Backs the scale off after a skipped step, grows it after growth_interval good ones; a new step."""
        torch._amp_update_scale_(self._scale, self._growth_tracker, self._found_inf, self.growth_factor,
                                 self.backoff_factor, self.growth_interval)
        self._unscaled = False

    def state_dict(self) -> dict:
        """GradScaler's keys and values (host reads: called at checkpoints)."""
        return {"scale": self.get_scale(), "growth_factor": self.growth_factor, "backoff_factor": self.backoff_factor,
                "growth_interval": self.growth_interval, "_growth_tracker": int(self._growth_tracker.item())}

    def load_state_dict(self, state: dict) -> None:
        """A state of this class or of torch.amp.GradScaler."""
        missing = [k for k in ("scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker")
                   if k not in state]
        if missing:
            raise ValueError(f"LossScaler.load_state_dict: the state lacks {', '.join(missing)} (a state of "
                             "LossScaler or torch.amp.GradScaler, saved while it was enabled, is needed)")
        self._scale.fill_(float(state["scale"]))
        self._growth_tracker.fill_(int(state["_growth_tracker"]))
        self.growth_factor = float(state["growth_factor"])
        self.backoff_factor = float(state["backoff_factor"])
        self.growth_interval = int(state["growth_interval"])
