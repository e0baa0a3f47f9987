"""Optimisation: the trainer's `optim` section (batch, schedule, optimizer, precision), the optimizer built
from it, and the two per-step schedules (the learning rate, the soft objective's weight).

Optimizers: SGD and AdamW are torch's fused implementations; LAMB (You et al. 2019, "Large Batch
Optimization for Deep Learning") and LARS (You et al. 2017, "Large Batch Training of Convolutional
Networks") are not in torch and are written here with foreach ops. All four skip a step on the device when
`optimizer.found_inf` (a 0-dim tensor) is 1, with no host sync: how --skip-nonfinite works. All four take
--amp fp16's grad scaler the way torch's fused optimizers do (`_step_supports_amp_scaling`: the scaler hands
them its scale and its found_inf, and they unscale and skip on the device), so no optimizer's fp16 step reads
a value on the host, and every one can be captured in a CUDA graph (--cuda-graphs)."""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass

import torch

from collab_fast.cli import check_fields, setting
from collab_fast.scaler import LossScaler

__all__ = ["LAMB", "LARS", "OptimConfig", "Schedule", "lr_factor", "make_optimizer", "soft_factor"]

OPTIMIZERS = ("sgd", "adamw", "lamb", "lars")


@dataclass
class OptimConfig:
    """Batch, schedule and optimizer: the trainer's `optim` section."""

    batch_size: int = setting(256, "images per process and optimizer step (before --accum-steps)", lo=1, hi=2**20,
                              short="-b")
    accum_steps: int = setting(1, "micro-batches per optimizer step (each takes every k-th sample, like DDP ranks)", lo=1)
    epochs: int = setting(90, "training epochs", lo=1)
    max_steps: int | None = setting(None, "stop after this many optimizer steps (tests, benchmarks)", lo=1)
    lr: float | None = setting(None, "peak learning rate; unset: 0.1 x global batch / 256 (SGD, LARS), 0.001 x global "
                                     "batch / 256 (AdamW, LAMB)", lo=0, lo_open=True)
    optimizer: str = setting("sgd", "optimizer: SGD with momentum, AdamW, LAMB or LARS (layer-wise trust ratios for large "
                              "batches); batch-norm parameters and biases get no weight decay (nor, under LARS, a "
                              "trust ratio)",
                             choices=OPTIMIZERS, name="opt")
    momentum: float = setting(0.9, "SGD and LARS momentum; beta1 of AdamW and LAMB", lo=0, hi=1, hi_open=True)
    beta2: float = setting(0.999, "AdamW and LAMB: decay of the squared-gradient average", lo=0, hi=1, hi_open=True)
    opt_eps: float = setting(1e-8, "AdamW and LAMB: epsilon of the denominator (float32 arithmetic: 1e-30 at least)",
                             lo=1e-30)
    lars_eta: float = setting(1e-3, "LARS: trust coefficient (the layer's step is eta ||w|| / (||g|| + wd ||w||) of the LR)",
                              lo=0, lo_open=True)
    wd: float = setting(1e-4, "weight decay (not on batch-norm parameters and biases); decoupled for AdamW and LAMB",
                        lo=0)
    nesterov: bool = setting(False, "Nesterov momentum (SGD)")
    model_ema: float | None = setting(None, "keep an exponential moving average of the weights with this decay per "
                                            "optimizer step (e.g. 0.9999), evaluated and saved beside the model; unset: "
                                            "off", lo=0, hi=1, lo_open=True, hi_open=True, metavar="DECAY")
    clip_grad: float | None = setting(None, "clip the gradients' global L2 norm to this (after unscaling under fp16), on "
                                            "the device; unset: no clipping", lo=0, lo_open=True)
    schedule: str = setting("step", "learning-rate schedule: x0.1 at the milestones, or cosine to 0",
                            choices=("step", "cosine"))
    lr_milestones: list[float] = setting([], "epochs of the x0.1 steps, e.g. 30,60,80; empty: 1/3, 2/3, 8/9 of the run",
                                         metavar="E1,E2,...")
    warmup_epochs: float = setting(0.0, "linear learning-rate warm-up from 0, in epochs", lo=0)
    soft_ramp: float = setting(0.0, "epochs over which the soft objective's weight rises from near 0 to its full value "
                                    "(exp(-5 (1 - t)^2), t = epoch / ramp, per step; Laine & Aila 2017): early consensus "
                                    "of untrained heads is noise; 0: full weight from the start", lo=0)
    amp: str | None = setting(None, "autocast precision; unset: bf16 on CUDA, off on CPU", choices=("bf16", "fp16", "off"))
    skip_nonfinite: bool = setting(False, "skip steps whose loss is not finite (counted) instead of stopping")

    def __post_init__(self):
        check_fields(self)
        if self.skip_nonfinite and self.amp == "fp16":
            raise ValueError("--skip-nonfinite cannot be combined with --amp fp16, whose grad scaler already skips "
                             "steps with non-finite gradients")
        if self.batch_size % self.accum_steps:
            raise ValueError(f"--batch-size {self.batch_size} must be a multiple of --accum-steps {self.accum_steps}")

    def resolved(self, *, cuda: bool, world: int, resumed: dict | None = None) -> OptimConfig:
        """A copy with every "unset" filled from the device, the number of processes and, for a resumed run,
        the checkpoint's resolved settings (`resumed`): default milestones follow --epochs, so a run continued
        to more epochs keeps the milestones it was trained with (pass --lr-milestones to set others)."""
        out = copy.copy(self)
        out.amp = self.amp or ("bf16" if cuda else "off")
        base = 0.1 if self.optimizer in ("sgd", "lars") else 1e-3
        out.lr = base * self.batch_size * world / 256 if self.lr is None else self.lr
        if self.schedule == "step" and not self.lr_milestones:
            old = (resumed or {}).get("lr_milestones")
            kept = old and resumed.get("schedule") == "step"
            out.lr_milestones = ([float(m) for m in old] if kept
                                 else [round(self.epochs * f, 3) for f in (1 / 3, 2 / 3, 8 / 9)])
        return out

    def build(self, net: torch.nn.Module, device: torch.device, capturable: bool = False, compiled: bool = False):
        """(optimizer, fp16 grad scaler or None) for `net` on `device`, from these (resolved) settings;
        capturable: the optimizer will be captured in a CUDA graph (--cuda-graphs); compiled: the whole step
        will be compiled (--compile-step), so fp16 takes scaler.LossScaler, which Dynamo traces (torch's
        GradScaler is on its skip list)."""
        optimizer = make_optimizer(net, self, capturable=capturable)
        if self.amp != "fp16":
            return optimizer, None
        return optimizer, LossScaler(optimizer) if compiled else torch.amp.GradScaler(device.type)


def make_optimizer(model: torch.nn.Module, optim: OptimConfig, fused: bool = True,
                   capturable: bool = False) -> torch.optim.Optimizer:
    """The optimizer `optim` names. fused=False: SGD and AdamW as torch's foreach implementations (a framework
    that unscales and clips the gradients itself refuses fused optimizers, which unscale internally).
    capturable: AdamW keeps what it needs on the device for a CUDA graph capture (torch's `capturable`); SGD,
    LAMB and LARS are capturable as they are."""
    # No weight decay on batch-norm parameters and biases (standard for ResNets at large batch).
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.dim() <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": optim.wd}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused SGD reads `found_inf` on the device: it is how a non-finite step is skipped without a sync.
    if optim.lr is None:
        raise ValueError("make_optimizer: lr is unset; give lr, or pass optim.resolved(cuda=..., world=...)")
    if optim.optimizer == "adamw":
        adamw = torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.momentum, optim.beta2), eps=optim.opt_eps,
                                  fused=fused or None, capturable=capturable)
        # its warm-up steps run uncaptured on purpose (torch warns once about capturable outside a capture)
        adamw._warned_capturable_if_run_uncaptured = capturable
        return adamw
    if optim.optimizer == "lamb":
        return LAMB(groups, lr=optim.lr, betas=(optim.momentum, optim.beta2), eps=optim.opt_eps)
    if optim.optimizer == "lars":
        groups[1]["trust"] = False  # norms and biases: plain momentum SGD (the usual LARS exclusion)
        return LARS(groups, lr=optim.lr, momentum=optim.momentum, eta=optim.lars_eta)
    opt_ = torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum, nesterov=optim.nesterov, fused=fused or None)
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


class Schedule:
    """A run's per-step schedules (--schedule, --lr-milestones, --warmup-epochs; --soft-ramp) over its steps
    per epoch: the learning rate and the soft objective's factor at optimizer step `step` (0-based)."""

    KEYS = ("schedule", "epochs", "lr_milestones", "warmup_epochs", "lr")  # the settings it follows (flat names)

    def __init__(self, optim: OptimConfig, steps_per_epoch: int):
        self.optim, self.steps_per_epoch = optim, steps_per_epoch
        self.ramps_soft = optim.soft_ramp > 0

    def lr(self, step: int) -> float:
        return self.optim.lr * lr_factor(self.optim, step, self.steps_per_epoch)

    def soft(self, step: int) -> float:
        return soft_factor(self.optim, step, self.steps_per_epoch)

    def change_from(self, saved: dict, step: int) -> str | None:
        """What a resumed run does to the learning rate at its first step when its schedule settings differ from
        the checkpoint's (`saved`, its resolved config; a cosine schedule follows --epochs, so continuing to more
        epochs raises the LR): a sentence naming both values, or None when they agree."""
        optim = self.optim
        try:
            was = Schedule(dataclasses.replace(optim, **{k: saved[k] for k in self.KEYS if k in saved}),
                           self.steps_per_epoch).lr(step)
        except (TypeError, ValueError):  # a checkpoint of a version that recorded other settings: nothing to compare
            return None
        now = self.lr(step)
        if math.isclose(was, now, rel_tol=1e-9, abs_tol=0.0):
            return None
        why = [f"--{k.replace('_', '-')} {saved[k]} -> {getattr(optim, k)}" for k in self.KEYS
               if k in saved and saved[k] != getattr(optim, k)]
        if optim.schedule == "cosine" and "epochs" in saved and saved["epochs"] != optim.epochs:
            why.append("a cosine schedule follows --epochs")
        return (f"the learning-rate schedule differs from the checkpoint's ({'; '.join(why) or 'its settings'}): at "
                f"step {step + 1} the learning rate becomes {now:.6g} where the checkpoint's schedule gives {was:.6g}; "
                "resume with the checkpoint's settings to continue its schedule")


def _keep(optimizer: torch.optim.Optimizer, like: torch.Tensor) -> torch.Tensor | None:
    """1 where found_inf is 0, else 0, as a 0-dim tensor on `like`'s device (None when no skip was asked for;
    the fp16 scaler's found_inf is a sum over devices, so any non-zero means skip)."""
    found = getattr(optimizer, "found_inf", None)
    return None if found is None else (found.to(like.device) == 0).to(like.dtype)


def _kept_grads(optimizer: torch.optim.Optimizer, params: list[torch.Tensor],
                keep: torch.Tensor | None) -> list[torch.Tensor]:
    """The gradients, unscaled where the fp16 grad scaler handed its scale (`optimizer.grad_scale`), and zeroed
    where the step is skipped: a skipped step's gradients are often NaN or inf, and x + 0 * NaN is NaN, so they
    must not reach the arithmetic that the skip then undoes (one where each)."""
    grads = [p.grad for p in params]
    scale = getattr(optimizer, "grad_scale", None)
    if scale is not None:
        grads = torch._foreach_mul(grads, scale.to(grads[0].device).reciprocal())
    if keep is None:
        return grads
    ok = keep > 0
    return [torch.where(ok, g, 0.0) for g in grads]


def lerp_(dst: list[torch.Tensor], src: list[torch.Tensor], weight: torch.Tensor) -> None:
    """dst += weight * (src - dst) for a 0-dim weight tensor on the device (foreach, no sync)."""
    diff = torch._foreach_sub(src, dst)
    torch._foreach_mul_(diff, weight)
    torch._foreach_add_(dst, diff)


def _with_grads(optimizer: torch.optim.Optimizer):
    """(group, its parameters that have a gradient) for every group with any."""
    for group in optimizer.param_groups:
        params = [p for p in group["params"] if p.grad is not None]
        if params:
            yield group, params


def _trust(w_norm: torch.Tensor, u_norm: torch.Tensor, coef: float = 1.0) -> torch.Tensor:
    # coef ||w|| / ||u||, and 1 where either norm is 0 (a zero-initialised layer, a zero update)
    ok = (w_norm > 0) & (u_norm > 0)
    return torch.where(ok, coef * w_norm / torch.where(ok, u_norm, 1.0), 1.0)


class LAMB(torch.optim.Optimizer):
    """LAMB: Adam's moments with bias correction, decoupled weight decay in the update, and each tensor's
    step scaled by the trust ratio ||w|| / ||update||:

        m = b1 m + (1 - b1) g,  v = b2 v + (1 - b2) g^2,  u = m / (1 - b1^t) / (sqrt(v / (1 - b2^t)) + eps) + wd w
        w = w - lr * (||w|| / ||u||) * u
    """

    _step_supports_amp_scaling = True  # reads the fp16 scaler's grad_scale and found_inf (_kept_grads, _keep)

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for group, params in _with_grads(self):
            b1, b2 = group["betas"]
            for p in params:
                if not self.state[p]:
                    self.state[p].update(step=torch.zeros((), device=p.device), exp_avg=torch.zeros_like(p),
                                         exp_avg_sq=torch.zeros_like(p))
            st = [self.state[p] for p in params]
            m, v, steps = [s["exp_avg"] for s in st], [s["exp_avg_sq"] for s in st], [s["step"] for s in st]
            keep = _keep(self, params[0])
            grads = _kept_grads(self, params, keep)
            m_new = torch._foreach_mul(m, b1)
            torch._foreach_add_(m_new, grads, alpha=1 - b1)
            v_new = torch._foreach_mul(v, b2)
            torch._foreach_addcmul_(v_new, grads, grads, value=1 - b2)
            t = [s + 1 if keep is None else s + keep for s in steps]
            # bias corrections on the device: the step count is a tensor (no sync). A first step skipped leaves
            # the count at 0, whose corrections (1 - b^0 = 0) would make the discarded update 0/0, and
            # NaN x 0 is still NaN in the parameters: the corrections take at least step 1.
            tc = t if keep is None else torch._foreach_clamp_min(t, 1)
            c1 = [1 - torch.pow(b1, ti.to(p.dtype)) for ti, p in zip(tc, params)]
            c2 = [torch.sqrt(1 - torch.pow(b2, ti.to(p.dtype))) for ti, p in zip(tc, params)]
            denom = torch._foreach_sqrt(v_new)
            torch._foreach_div_(denom, c2)
            torch._foreach_add_(denom, group["eps"])
            u = torch._foreach_div(m_new, denom)
            torch._foreach_div_(u, c1)
            if group["weight_decay"]:
                torch._foreach_add_(u, params, alpha=group["weight_decay"])
            ratio = [_trust(wn, un) for wn, un in zip(torch._foreach_norm(params), torch._foreach_norm(u))]
            scale = [-group["lr"] * r if keep is None else -group["lr"] * r * keep for r in ratio]
            torch._foreach_mul_(u, scale)
            torch._foreach_add_(params, u)
            if keep is None:
                torch._foreach_copy_(m, m_new), torch._foreach_copy_(v, v_new), torch._foreach_copy_(steps, t)
            else:  # a skipped step leaves the moments and the count as they were
                lerp_(m, m_new, keep), lerp_(v, v_new, keep)
                torch._foreach_copy_(steps, t)
        return loss


class LARS(torch.optim.Optimizer):
    """LARS: momentum SGD whose step for each tensor of a `trust` group is scaled by the layer's trust ratio
    eta ||w|| / (||g|| + wd ||w||) (You et al. 2017, eq. 6; 1 where a norm is 0); groups with trust=False take
    plain momentum SGD:

        d = g + wd w,  r = eta ||w|| / (||g|| + wd ||w||) (trust groups) or 1,  buf = momentum buf + lr r d,
        w = w - buf

    The same step as timm's `Lars` (and apex's LARC) while the LR is constant; the LR sits inside the buffer
    (Goyal et al. 2017), so a changing LR moves the next step only, not the momentum already gathered."""

    _step_supports_amp_scaling = True  # as LAMB

    def __init__(self, params, lr: float, momentum: float = 0.9, eta: float = 1e-3, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, eta=eta, weight_decay=weight_decay, trust=True))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for group, params in _with_grads(self):
            for p in params:
                if not self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            bufs = [self.state[p]["momentum_buffer"] for p in params]
            keep = _keep(self, params[0])
            grads = _kept_grads(self, params, keep)
            d = torch._foreach_add(grads, params, alpha=group["weight_decay"])  # g + wd w
            if group["trust"]:
                # the published ratio: eta ||w|| / (||g|| + wd ||w||), not eta ||w|| / ||g + wd w||
                w_norms = torch._foreach_norm(params)
                denom = torch._foreach_add(torch._foreach_norm(grads), torch._foreach_mul(w_norms, group["weight_decay"]))
                torch._foreach_mul_(d, [_trust(wn, dn, group["eta"]) for wn, dn in zip(w_norms, denom)])
            new = torch._foreach_mul(bufs, group["momentum"])
            torch._foreach_mul_(d, group["lr"])  # not alpha=: the LR may be a device tensor (--compile-step)
            torch._foreach_add_(new, d)
            if keep is not None:  # skipped: the buffer as it was, and no step
                lerp_(bufs, new, keep)
                torch._foreach_sub_(params, torch._foreach_mul(bufs, keep))
            else:
                torch._foreach_copy_(bufs, new)
                torch._foreach_sub_(params, bufs)
        return loss
