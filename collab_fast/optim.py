"""Optimisation: the trainer's `optim` section (batch, schedule, SGD, precision), the optimizer built from
it, and the two per-step schedules (the learning rate, the soft objective's weight)."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from collab_fast.cli import check_fields, opt

__all__ = ["OptimConfig", "lr_factor", "make_optimizer", "soft_factor"]


@dataclass
class OptimConfig:
    """Batch, schedule and optimizer: the trainer's `optim` section."""

    batch_size: int = opt(256, "images per process and optimizer step (before --accum-steps)", lo=1, hi=2**20,
                          short="-b")
    accum_steps: int = opt(1, "micro-batches per optimizer step (each takes every k-th sample, like DDP ranks)", lo=1)
    epochs: int = opt(90, "training epochs", lo=1)
    max_steps: int | None = opt(None, "stop after this many optimizer steps (tests, benchmarks)", lo=1)
    lr: float | None = opt(None, "peak learning rate; unset: 0.1 x global batch / 256", lo=0, lo_open=True)
    momentum: float = opt(0.9, "SGD momentum", lo=0, hi=1, hi_open=True)
    wd: float = opt(1e-4, "weight decay (not on batch-norm parameters and biases)", lo=0)
    nesterov: bool = opt(False, "Nesterov momentum")
    schedule: str = opt("step", "learning-rate schedule: x0.1 at the milestones, or cosine to 0",
                        choices=("step", "cosine"))
    lr_milestones: list[float] = opt([], "epochs of the x0.1 steps, e.g. 30,60,80; empty: 1/3, 2/3, 8/9 of the run",
                                     metavar="E1,E2,...")
    warmup_epochs: float = opt(0.0, "linear learning-rate warm-up from 0, in epochs", lo=0)
    soft_ramp: float = opt(0.0, "epochs over which the soft objective's weight rises from near 0 to its full value "
                                "(exp(-5 (1 - t)^2), t = epoch / ramp, per step; Laine & Aila 2017): early consensus "
                                "of untrained heads is noise; 0: full weight from the start", lo=0)
    amp: str | None = opt(None, "autocast precision; unset: bf16 on CUDA, off on CPU", choices=("bf16", "fp16", "off"))
    skip_nonfinite: bool = opt(False, "skip steps whose loss is not finite (counted) instead of stopping")

    def __post_init__(self):
        check_fields(self)
        if self.skip_nonfinite and self.amp == "fp16":
            raise ValueError("--skip-nonfinite cannot be combined with --amp fp16, whose grad scaler already skips "
                             "steps with non-finite gradients")
        if self.batch_size % self.accum_steps:
            raise ValueError(f"--batch-size {self.batch_size} must be a multiple of --accum-steps {self.accum_steps}")

    def resolved(self, *, cuda: bool, world: int) -> OptimConfig:
        """A copy with every "unset" filled from the device and the number of processes."""
        out = copy.copy(self)
        out.amp = self.amp or ("bf16" if cuda else "off")
        out.lr = 0.1 * self.batch_size * world / 256 if self.lr is None else self.lr
        if self.schedule == "step" and not self.lr_milestones:
            out.lr_milestones = [round(self.epochs * f, 3) for f in (1 / 3, 2 / 3, 8 / 9)]
        return out


def make_optimizer(model: torch.nn.Module, optim: OptimConfig) -> torch.optim.Optimizer:
    # No weight decay on batch-norm parameters and biases (standard for ResNets at large batch).
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.dim() <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": optim.wd}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused SGD reads `found_inf` on the device: it is how a non-finite step is skipped without a sync.
    if optim.lr is None:
        raise ValueError("make_optimizer: lr is unset; give lr, or pass optim.resolved(cuda=..., world=...)")
    opt_ = torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum, nesterov=optim.nesterov, fused=True)
    if optim.momentum > 0:
        # Zero momentum buffers up front: the fused SGD otherwise allocates them uninitialised on its first
        # step, and a first step skipped through found_inf (--skip-nonfinite, the fp16 scaler) would leave them
        # so. momentum * 0 + grad equals the first step's buf = grad bit for bit (no dampening).
        for p in model.parameters():
            opt_.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return opt_


def lr_factor(optim: OptimConfig, step: int, steps_per_epoch: int) -> float:
    """Learning-rate multiplier at optimizer step `step` (0-based)."""
    epoch = step / max(steps_per_epoch, 1)
    if optim.warmup_epochs > 0 and epoch < optim.warmup_epochs:
        # never above the peak: a warm-up shorter than one step is no warm-up
        return min(1.0, (step + 1) / max(optim.warmup_epochs * steps_per_epoch, 1.0))
    if optim.schedule == "cosine":
        t = (epoch - optim.warmup_epochs) / max(optim.epochs - optim.warmup_epochs, 1e-9)
        return 0.5 * (1 + math.cos(math.pi * min(max(t, 0.0), 1.0)))
    return 0.1 ** sum(epoch >= m for m in optim.lr_milestones)


def soft_factor(optim: OptimConfig, step: int, steps_per_epoch: int) -> float:
    """The soft objective's weight multiplier at optimizer step `step` (0-based): --soft-ramp's
    exp(-5 (1 - t)^2), t the fraction of the ramp done, then 1."""
    if optim.soft_ramp <= 0:
        return 1.0
    t = min(step / (optim.soft_ramp * max(steps_per_epoch, 1)), 1.0)
    return math.exp(-5.0 * (1.0 - t) ** 2) if t < 1.0 else 1.0
