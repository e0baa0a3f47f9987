"""Train a collaborative network: `python -m collab_fast.train DATASET --arch resnet50 --pattern hier4`.

One process per GPU under torchrun (DistributedDataParallel, NCCL; gloo on CPU), or one process alone.
Every pattern trains with fused_collab_loss (single = one head = plain cross-entropy). The hot path has no
host synchronisation: losses, accuracy and the non-finite flag accumulate on the device and are read at
log intervals. Outputs in --output: config.json, metrics.jsonl, TensorBoard events, last.pt / best.pt
(atomic), and head0.pth (the exported single network) at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import resource
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from collab_fast.checkpoint import FORMAT, CheckpointError, load_checkpoint, load_file, save_atomic
from collab_fast.data import DATASETS, build_loaders
from collab_fast.kernels.collab_loss import fused_collab_loss
from collab_fast.models import ARCHS, build
from collab_fast.models.collab import RESCALE_MODES, parse_pattern
from collab_fast.models.cost import pattern_cost
from collab_fast.recipes import RECIPES, describe


@dataclass
class TrainConfig:
    dataset: str  # imagenet | cifar10 | cifar100 | digits | toy | synthetic
    recipe: str | None = None  # the paper recipe the defaults came from (collab_fast.recipes)
    data: str | None = None  # data directory (imagenet, cifar*; toy: generated in the cache when unset)
    arch: str = "resnet50"  # see collab_fast.models.ARCHS
    pattern: str = "hier4"  # single | inst2 | inst4 | inst:N | ilr2 | hier4 | tree:AxB...
    num_classes: int | None = None  # set from the data set
    batch_size: int = 256  # per process (and per optimizer step, before --accum-steps)
    accum_steps: int = 1  # micro-batches per step; each takes every accum_steps-th sample, like DDP ranks
    epochs: int = 90
    max_steps: int | None = None  # stop after this many optimizer steps (tests, benchmarks)
    lr: float | None = None  # None: 0.1 x global batch / 256
    momentum: float = 0.9
    wd: float = 1e-4  # the paper's weight decay
    nesterov: bool = False
    schedule: str = "step"  # step (x0.1 at the milestones) | cosine
    lr_milestones: list[float] = field(default_factory=list)  # epochs; empty: 1/3, 2/3 and 8/9 of the run
    warmup_epochs: float = 0.0  # linear warm-up from 0
    temperature: float = 2.0  # T of the soft objective
    beta: float = 0.5  # weight of the hard objective
    soft_weight: float | None = None  # None: T^2 (the paper)
    detach_consensus: bool = True  # the consensus is a constant target
    rescale: str = "backprop"  # backprop | loss | none (the paper's Table 3 ablation)
    zero_init_residual: bool = True  # ResNets: each block's last BN scale starts at 0 (Goyal et al. 2017)
    label_smoothing: float = 0.0
    label_noise: float = 0.0  # fraction of training labels redrawn every epoch (paper Fig. 3)
    image_size: int | None = None  # None: 224 for folders, 32 for CIFAR / digits
    amp: str | None = None  # bf16 | fp16 | off; None: bf16 on CUDA, off on CPU
    channels_last: bool | None = None  # None: on with CUDA
    compile: bool = False  # torch.compile the model
    output: str | None = None  # None: runs/<dataset>_<arch>_<pattern>
    resume: str | None = None  # auto (OUTPUT/last.pt if present) | PATH
    weights: str | None = None  # initial weights: an exported head (.pth) or a training checkpoint
    seed: int = 0
    eval_only: bool = False  # evaluate --weights (or the resumed checkpoint) and exit
    log_every: int = 50  # optimizer steps between log lines (the only host syncs of the hot path)
    eval_every: int = 1  # epochs between evaluations
    skip_nonfinite: bool = False  # skip steps with a non-finite loss (counted) instead of stopping
    skip_bad_images: bool = False  # skip unreadable images (counted warning) instead of failing
    threads: int | None = None  # DALI CPU threads
    synthetic_steps: int = 100  # steps per epoch of the synthetic data set
    progress: bool | None = None  # live progress bar (None: when stderr is a terminal)


# ----------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------


def _float_list(text: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _positive_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m collab_fast.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("dataset", nargs="?", choices=DATASETS, help="the data set (a --recipe may set it)")
    a("--recipe", default=None, choices=list(RECIPES), help="a paper setting; explicit flags override it")
    a("--list-recipes", action="store_true", help="print the recipes and their settings, then exit")
    a("--data", default=None, metavar="DIR", help="data directory")
    a("--arch", default="resnet50", choices=list(ARCHS))
    a("--pattern", default="hier4", help="single, inst2, inst4, inst:N, ilr2, hier4, tree:AxB... (default hier4)")
    a("-b", "--batch-size", type=_positive_int, default=256, help="per process (default 256)")
    a("--accum-steps", type=_positive_int, default=1, help="micro-batches per optimizer step")
    a("--epochs", type=_positive_int, default=90)
    a("--max-steps", type=_positive_int, default=None, help="stop after this many optimizer steps")
    a("--lr", type=float, default=None, help="default 0.1 x global batch / 256")
    a("--momentum", type=float, default=0.9)
    a("--wd", "--weight-decay", dest="wd", type=float, default=1e-4)
    a("--nesterov", action="store_true")
    a("--schedule", choices=["step", "cosine"], default="step")
    a("--lr-milestones", type=_float_list, default=[], help="epochs of the x0.1 steps, e.g. 30,60,80")
    a("--warmup-epochs", type=float, default=0.0)
    a("--temperature", type=float, default=2.0)
    a("--beta", type=float, default=0.5)
    a("--soft-weight", type=float, default=None, help="default T^2")
    a("--detach-consensus", action=argparse.BooleanOptionalAction, default=True)
    a("--rescale", choices=RESCALE_MODES, default="backprop")
    a("--zero-init-residual", action=argparse.BooleanOptionalAction, default=True,
      help="ResNets: start every residual branch at zero (default on)")
    a("--label-smoothing", type=float, default=0.0)
    a("--label-noise", type=float, default=0.0)
    a("--image-size", type=_positive_int, default=None)
    a("--amp", choices=["bf16", "fp16", "off"], default=None, help="default bf16 on CUDA, off on CPU")
    a("--channels-last", action=argparse.BooleanOptionalAction, default=None, help="default on with CUDA")
    a("--compile", action="store_true")
    a("--output", default=None, metavar="DIR")
    a("--resume", default=None, metavar="auto|PATH")
    a("--weights", default=None, metavar="PATH", help="initial weights (exported head or checkpoint)")
    a("--seed", type=int, default=0)
    a("--eval-only", action="store_true")
    a("--log-every", type=_positive_int, default=50)
    a("--eval-every", type=_positive_int, default=1)
    a("--skip-nonfinite", action="store_true", help="skip steps whose loss is not finite, and count them")
    a("--skip-bad-images", action="store_true")
    a("--threads", type=_positive_int, default=None, help="DALI CPU threads")
    a("--synthetic-steps", type=_positive_int, default=100)
    a("--progress", action=argparse.BooleanOptionalAction, default=None)
    return p


def parse_config(argv=None) -> TrainConfig:
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    if first.list_recipes:
        print(describe())
        parser.exit(0)
    if first.recipe:
        parser.set_defaults(**RECIPES[first.recipe])  # defaults: any flag given explicitly wins
    args = vars(parser.parse_args(argv))
    args.pop("list_recipes")
    if args["dataset"] is None:
        parser.error("the data set is required (e.g. digits, imagenet), unless a --recipe sets it")
    cfg = TrainConfig(**args)
    try:
        validate(cfg)
    except ValueError as exc:
        parser.error(str(exc))
    return cfg


def validate(cfg: TrainConfig) -> None:
    parse_pattern(cfg.pattern)
    for name, lo, hi in (("beta", 0, 1), ("label_smoothing", 0, 1), ("label_noise", 0, 1), ("momentum", 0, 1)):
        v = getattr(cfg, name)
        if not lo <= v <= hi:
            raise ValueError(f"--{name.replace('_', '-')} must be in [{lo}, {hi}], got {v}")
    if cfg.temperature <= 0:
        raise ValueError(f"--temperature must be > 0, got {cfg.temperature}")
    if cfg.lr is not None and cfg.lr <= 0:
        raise ValueError(f"--lr must be > 0, got {cfg.lr}")
    if cfg.wd < 0:
        raise ValueError(f"--wd must be >= 0, got {cfg.wd}")
    if cfg.dataset in ("imagenet", "cifar10", "cifar100") and not cfg.data:
        raise ValueError(f"{cfg.dataset} needs --data DIR")
    if cfg.data and not Path(cfg.data).is_dir():
        raise ValueError(f"--data {cfg.data}: no such directory")
    if cfg.weights and not Path(cfg.weights).is_file():
        raise ValueError(f"--weights {cfg.weights}: no such file")
    if cfg.eval_only and not (cfg.weights or cfg.resume):
        raise ValueError("--eval-only needs --weights PATH or --resume")
    if cfg.skip_nonfinite and cfg.amp == "fp16":
        raise ValueError("--skip-nonfinite cannot be combined with --amp fp16, whose grad scaler already skips "
                         "steps with non-finite gradients")
    if cfg.batch_size % cfg.accum_steps:
        raise ValueError(f"--batch-size {cfg.batch_size} must be a multiple of --accum-steps {cfg.accum_steps}")


# ----------------------------------------------------------------------------------------------------
# setup
# ----------------------------------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> tuple[Dist, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
            dist.init_process_group("nccl", device_id=torch.device("cuda", local))
        else:
            dist.init_process_group("gloo")
        d = Dist(rank, world, local)
    else:
        d = Dist()
    device = torch.device("cuda", d.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    return d, device


def resolve(cfg: TrainConfig, device: torch.device, d: Dist) -> TrainConfig:
    """Fills every None default from the device and the data set."""
    cuda = device.type == "cuda"
    cfg.amp = cfg.amp or ("bf16" if cuda else "off")
    cfg.channels_last = cuda if cfg.channels_last is None else cfg.channels_last
    if cfg.image_size is None:
        cfg.image_size = 224 if cfg.dataset in ("imagenet", "toy", "synthetic") else 32
    if cfg.lr is None:
        cfg.lr = 0.1 * cfg.batch_size * d.world / 256
    if cfg.schedule == "step" and not cfg.lr_milestones:
        cfg.lr_milestones = [round(cfg.epochs * f, 3) for f in (1 / 3, 2 / 3, 8 / 9)]
    if cfg.output is None:
        cfg.output = os.path.join("runs", f"{cfg.dataset}_{cfg.arch}_{cfg.pattern.replace(':', '')}")
    if cfg.progress is None:
        cfg.progress = sys.stderr.isatty()
    return cfg


def seed_everything(seed: int, rank: int) -> None:
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed)  # the same initial weights on every rank


def lr_factor(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Learning-rate multiplier at optimizer step `step` (0-based)."""
    epoch = step / max(steps_per_epoch, 1)
    if cfg.warmup_epochs > 0 and epoch < cfg.warmup_epochs:
        return (step + 1) / (cfg.warmup_epochs * steps_per_epoch)
    if cfg.schedule == "cosine":
        start = cfg.warmup_epochs
        t = (epoch - start) / max(cfg.epochs - start, 1e-9)
        return 0.5 * (1 + math.cos(math.pi * min(max(t, 0.0), 1.0)))
    return 0.1 ** sum(epoch >= m for m in cfg.lr_milestones)


def make_model(cfg: TrainConfig, num_classes: int, device: torch.device) -> torch.nn.Module:
    arch_kw = {"zero_init_residual": cfg.zero_init_residual} if cfg.arch.startswith("resnet") else {}
    model = build(cfg.arch, cfg.pattern, num_classes=num_classes, rescale=cfg.rescale, **arch_kw).to(device)
    return model.to(memory_format=torch.channels_last) if cfg.channels_last else model


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # No weight decay on batch-norm parameters and biases (standard for ResNets at large batch).
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.dim() <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.wd}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused SGD reads `found_inf` on the device: it is how a non-finite step is skipped without a sync.
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, fused=True)


# ----------------------------------------------------------------------------------------------------
# training and evaluation
# ----------------------------------------------------------------------------------------------------


class Meter:
    """Sums kept on the device; read (one sync) only when logging."""

    def __init__(self, num_heads: int, device: torch.device):
        self.h, self.device = num_heads, device
        self.reset()

    def reset(self) -> None:
        z = lambda *s: torch.zeros(*s, device=self.device, dtype=torch.float64)
        self.loss, self.hard, self.soft, self.correct, self.count = z(()), z(self.h), z(self.h), z(self.h), z(())
        self.steps = 0

    def add(self, loss: torch.Tensor, stats) -> None:
        n = stats.num_valid.double()
        self.loss += loss.detach().double() * n
        self.hard += stats.hard.double() * n
        self.soft += stats.soft.double() * n
        self.correct += stats.correct.double()
        self.count += n
        self.steps += 1

    def read(self, d: Dist) -> dict:
        t = torch.cat([self.loss[None], self.hard, self.soft, self.correct, self.count[None]])
        if d.world > 1:
            dist.all_reduce(t)
        t = t.cpu()
        n = max(float(t[-1]), 1.0)
        h = self.h
        return {"loss": float(t[0]) / n, "hard": (t[1 : 1 + h] / n).tolist(), "soft": (t[1 + h : 1 + 2 * h] / n).tolist(),
                "train_acc": (t[1 + 2 * h : 1 + 3 * h] / n).tolist(), "samples": int(t[-1])}


def as_heads(logits: torch.Tensor) -> torch.Tensor:
    return logits if logits.dim() == 3 else logits.unsqueeze(0)  # single network: [N, C] -> [1, N, C]


def loss_fn(cfg: TrainConfig, logits: torch.Tensor, y: torch.Tensor):
    return fused_collab_loss(logits, y, temperature=cfg.temperature, beta=cfg.beta, soft_weight=cfg.soft_weight,
                             detach_consensus=cfg.detach_consensus, label_smoothing=cfg.label_smoothing,
                             return_stats=True)


class Stop(Exception):
    """Raised inside the loop to end the run cleanly (signal, non-finite loss)."""


@dataclass
class State:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch
    batch_in_epoch: int = 0  # batches of the current epoch already consumed
    best_top1: float = -1.0
    skipped: int = 0  # non-finite steps skipped (--skip-nonfinite)


def train_step(model, x: torch.Tensor, y: torch.Tensor, optimizer, scaler, cfg: TrainConfig, loss_scale: float,
               meter: Meter | None = None) -> torch.Tensor:
    """One optimizer step (forward, fused loss, backward, update) with no host sync. Returns the step's
    loss on the device (the sum over micro-batches, each a mean); a non-finite step is skipped on the
    device when cfg.skip_nonfinite."""
    device = x.device
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
    step_loss = torch.zeros((), device=device)
    for k in range(cfg.accum_steps):
        xk, yk = (x, y) if cfg.accum_steps == 1 else (x[k :: cfg.accum_steps], y[k :: cfg.accum_steps])
        # DDP: all-reduce the gradients once, after the last micro-batch (no_sync covers forward and backward)
        sync = k == cfg.accum_steps - 1 or not hasattr(model, "no_sync")
        with contextlib.nullcontext() if sync else model.no_sync():
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = as_heads(model(xk))
            loss, stats = loss_fn(cfg, logits, yk)
            if meter is not None:
                meter.add(loss, stats)
            step_loss += loss.detach()
            scaled = loss * (loss_scale / cfg.accum_steps)
            scaler.scale(scaled).backward() if scaler is not None else scaled.backward()
    if cfg.skip_nonfinite:
        optimizer.found_inf = (~torch.isfinite(step_loss)).float()  # fused SGD skips the update on the device
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return step_loss


def train_one_epoch(model, raw_model, loader, optimizer, scaler, cfg: TrainConfig, state: State, d: Dist,
                    log, stop_flag: dict) -> None:
    device = next(raw_model.parameters()).device
    heads = getattr(raw_model, "num_heads", 1)
    loss_scale = getattr(raw_model, "loss_scale", 1.0)
    meter = Meter(heads, device)
    first_bad = torch.full((), -1, dtype=torch.int64, device=device)  # first non-finite step, on the device
    skipped = torch.zeros((), dtype=torch.int64, device=device)
    steps_per_epoch = len(loader)
    model.train()
    t0, seen, clock = time.perf_counter(), 0, StepClock()
    batches = loader.iter_from(state.batch_in_epoch) if hasattr(loader, "iter_from") else _skip(loader, state)
    for x, y in batches:
        if stop_flag.get("signal"):
            raise Stop(f"received {stop_flag['signal']}")
        lr = cfg.lr * lr_factor(cfg, state.step, steps_per_epoch)
        for g in optimizer.param_groups:
            g["lr"] = lr
        step_loss = train_step(model, x, y, optimizer, scaler, cfg, loss_scale, meter)
        bad = ~torch.isfinite(step_loss)
        first_bad = torch.where(bad & (first_bad < 0), state.step, first_bad)
        skipped += bad
        state.step += 1
        state.batch_in_epoch += 1
        seen += x.shape[0]
        total = min(cfg.epochs * steps_per_epoch, cfg.max_steps or 1 << 62)
        if cfg.progress and d.main:  # host-side numbers only: no sync
            rate = clock.rate(time.perf_counter())
            eta = (total - state.step) / rate if rate else float("nan")
            print(f"\033[K epoch {state.epoch} step {state.batch_in_epoch}/{steps_per_epoch} "
                  f"({state.step}/{total}) {rate * x.shape[0] * d.world:.1f} img/s ETA {_hms(eta)}", end="\r",
                  file=sys.stderr, flush=True)
        last = state.batch_in_epoch >= steps_per_epoch or (cfg.max_steps and state.step >= cfg.max_steps)
        if state.step % cfg.log_every == 0 or last:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            if int(first_bad) >= 0 and not cfg.skip_nonfinite:
                raise Stop(f"non-finite loss at step {int(first_bad) + 1} (epoch {state.epoch}); the run stops "
                           "and keeps the last good checkpoint (--skip-nonfinite skips such steps instead)")
            state.skipped += int(skipped)
            skipped.zero_()
            rec = meter.read(d)
            eta = (total - state.step) * dt / max(meter.steps, 1) / cfg.accum_steps
            rec.update(step=state.step, epoch=state.epoch, lr=lr, img_per_s=seen * d.world / dt,
                       skipped_steps=state.skipped, eta_s=eta, **memory_stats(device))
            log(rec, kind="train")
            meter.reset()
            t0, seen = time.perf_counter(), 0
        if cfg.max_steps and state.step >= cfg.max_steps:
            return


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "--:--:--"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class StepClock:
    """Recent optimizer steps per second, from host time stamps (the progress bar's rate and ETA)."""

    def __init__(self, window: int = 20):
        self.stamps: list[float] = []
        self.window = window

    def rate(self, now: float) -> float:
        self.stamps = (self.stamps + [now])[-self.window :]
        if len(self.stamps) < 2:
            return 0.0
        return (len(self.stamps) - 1) / (self.stamps[-1] - self.stamps[0])


def _skip(loader, state: State):
    """Resume mid-epoch on a loader that cannot seek (DALI): read and drop the consumed batches."""
    for i, batch in enumerate(loader):
        if i >= state.batch_in_epoch:
            yield batch


@torch.no_grad()
def evaluate(model, loader, cfg: TrainConfig, d: Dist) -> dict:
    """Top-1/top-5 of head 0 (the paper's number), of every head and of the mean-logit ensemble; loss."""
    raw = model.module if hasattr(model, "module") else model
    device = next(raw.parameters()).device
    heads = getattr(raw, "num_heads", 1)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
    model.eval()
    top1 = torch.zeros(heads + 1, device=device, dtype=torch.float64)  # heads..., ensemble
    top5 = torch.zeros(heads + 1, device=device, dtype=torch.float64)
    hard = torch.zeros((), device=device, dtype=torch.float64)
    total = torch.zeros((), device=device, dtype=torch.float64)
    count = torch.zeros((), device=device, dtype=torch.float64)
    for x, y in loader:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = as_heads(model(x))
        logits = logits.float()
        loss, stats = loss_fn(cfg, logits, y)
        both = torch.cat([logits, logits.mean(0, keepdim=True)])  # [H + 1, N, C]
        k = min(5, both.shape[-1])
        pred = both.topk(k, dim=-1).indices  # [H + 1, N, k]
        hit = pred == y[None, :, None]
        top1 += hit[..., 0].sum(1)
        top5 += hit.any(-1).sum(1)
        n = stats.num_valid.double()
        hard += stats.hard[0].double() * n
        total += loss.double() * n
        count += n
    t = torch.cat([top1, top5, hard[None], total[None], count[None]])
    if d.world > 1:
        dist.all_reduce(t)
    t = t.cpu().tolist()
    n = max(t[-1], 1.0)
    h = heads + 1
    acc1, acc5 = [100 * v / n for v in t[:h]], [100 * v / n for v in t[h : 2 * h]]
    return {"top1": acc1[0], "top5": acc5[0], "top1_heads": acc1[:-1], "top5_heads": acc5[:-1],
            "top1_ensemble": acc1[-1], "top5_ensemble": acc5[-1], "val_loss_head0": t[2 * h] / n,
            "val_loss": t[2 * h + 1] / n, "val_samples": int(t[-1])}


def memory_stats(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"peak_mem_mb": torch.cuda.max_memory_allocated(device) / 2**20}
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


# ----------------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------------


def rng_state() -> dict:
    # Plain lists and tuples: what torch.load(weights_only=True) accepts besides tensors.
    name, keys, pos, has_gauss, cached = np.random.get_state()
    s = {"torch": torch.get_rng_state(), "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
         "python": random.getstate()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    name, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = s["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save_checkpoint(path: Path, raw_model, optimizer, scaler, cfg: TrainConfig, state: State) -> None:
    save_atomic({
        "format": FORMAT,
        "model": raw_model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "config": dataclasses.asdict(cfg),
        "state": dataclasses.asdict(state),
        "rng": rng_state(),
    }, path)


def load_weights(raw_model, path: str) -> None:
    """--weights: an exported head (plain state dict) or a training checkpoint of the same model."""
    obj = load_file(path)
    sd = obj["model"] if isinstance(obj, dict) and obj.get("format") == FORMAT else obj
    if not isinstance(sd, dict):
        raise CheckpointError(f"--weights {path}: expected a state dict, found a {type(sd).__name__}")
    try:
        raw_model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"--weights {path} does not fit {type(raw_model).__name__}: "
                              f"{str(exc).splitlines()[0]} (an exported head needs --pattern single)") from None


# ----------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------


class Logger:
    def __init__(self, out: Path, enabled: bool, progress: bool):
        self.enabled, self.progress = enabled, progress
        self.file = open(out / "metrics.jsonl", "a") if enabled else None
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tb"))
            except Exception as exc:  # tensorboard missing: keep training, say so once
                print(f"note: TensorBoard events disabled ({type(exc).__name__}: {exc})", file=sys.stderr)

    def __call__(self, rec: dict, kind: str) -> None:
        if not self.enabled:
            return
        rec = {"kind": kind, "time": time.time(), **rec}
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k not in ("time", "step", "epoch"):
                    self.tb.add_scalar(f"{kind}/{k}", v, rec.get("step", 0))
                elif isinstance(v, list):
                    for i, x in enumerate(v):
                        self.tb.add_scalar(f"{kind}/{k}/head{i}", x, rec.get("step", 0))
        self.line(rec, kind)

    def line(self, rec: dict, kind: str) -> None:
        if kind == "train":
            acc = " ".join(f"{100 * a:.1f}" for a in rec["train_acc"])
            mem = rec.get("peak_mem_mb", rec.get("peak_rss_mb", 0))
            msg = (f"epoch {rec['epoch']} step {rec['step']}: loss {rec['loss']:.4f} lr {rec['lr']:.4g} "
                   f"train acc/head [{acc}] {rec['img_per_s']:.1f} img/s peak mem {mem:.0f} MB "
                   f"ETA {_hms(rec['eta_s'])}")
        else:
            heads = " ".join(f"{a:.2f}" for a in rec["top1_heads"])
            msg = (f"epoch {rec['epoch']} eval: top-1 head0 {rec['top1']:.2f}% top-5 {rec['top5']:.2f}% | "
                   f"top-1 per head [{heads}] ensemble {rec['top1_ensemble']:.2f}% | val loss {rec['val_loss']:.4f}")
        print(("\033[K" if self.progress else "") + msg, flush=True)

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def run(cfg: TrainConfig) -> dict:
    d, device = init_distributed()
    cfg = resolve(cfg, device, d)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed, d.rank)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    resume_path = None
    if cfg.resume:
        resume_path = out / "last.pt" if cfg.resume == "auto" else Path(cfg.resume)
        if cfg.resume == "auto" and not resume_path.exists():
            resume_path = None  # nothing to resume: a fresh run
    ckpt = load_checkpoint(resume_path) if resume_path else None

    dtype = torch.float16 if cfg.amp == "fp16" else torch.float32
    train_loader, val_loader, num_classes = build_loaders(
        cfg.dataset, data_dir=cfg.data, batch_size=cfg.batch_size, image_size=cfg.image_size, device=device,
        rank=d.rank, world=d.world, seed=cfg.seed, label_noise=cfg.label_noise, dtype=dtype,
        channels_last=cfg.channels_last, skip_bad_images=cfg.skip_bad_images, num_threads=cfg.threads,
        synthetic_steps=cfg.synthetic_steps)
    cfg.num_classes = num_classes
    raw = make_model(cfg, num_classes, device)
    if cfg.weights:
        load_weights(raw, cfg.weights)
    optimizer = make_optimizer(raw, cfg)
    scaler = torch.amp.GradScaler(device.type) if cfg.amp == "fp16" else None
    state = State()
    if ckpt is not None:
        if ckpt["config"].get("arch") != cfg.arch or ckpt["config"].get("pattern") != cfg.pattern:
            raise CheckpointError(f"{resume_path} is a {ckpt['config'].get('arch')} {ckpt['config'].get('pattern')} run, "
                                  f"not {cfg.arch} {cfg.pattern}")
        try:
            raw.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{resume_path} does not fit this run: {str(exc).splitlines()[0]}") from None
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        state = State(**ckpt["state"])
        set_rng_state(ckpt["rng"])
    model = raw
    if d.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(raw, device_ids=[d.local_rank] if device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)

    if d.main:
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1) + "\n")
        cost = pattern_cost(cfg.arch, cfg.pattern, cfg.image_size, num_classes)
        print(f"collab_fast: {cost.line()}")
        print(f"collab_fast: {cfg.dataset} ({num_classes} classes), {len(train_loader)} steps/epoch x {cfg.epochs} "
              f"epochs, global batch {cfg.batch_size * d.world}, lr {cfg.lr:g}, amp {cfg.amp}, device {device}"
              f"{f', {d.world} processes' if d.world > 1 else ''}; output {out}"
              + (f"; resumed at step {state.step}" if ckpt else ""))
    log = Logger(out, d.main, bool(cfg.progress))

    if cfg.eval_only:
        res = evaluate(model, val_loader, cfg, d)
        log({"epoch": state.epoch, "step": state.step, **res}, kind="eval")
        log.close()
        return res

    stop_flag: dict = {}
    handlers = {}

    def on_signal(signum, _frame):
        stop_flag["signal"] = signal.Signals(signum).name

    for sig in (signal.SIGINT, signal.SIGTERM):
        handlers[sig] = signal.signal(sig, on_signal)
    result: dict = {}
    try:
        while state.epoch < cfg.epochs and not (cfg.max_steps and state.step >= cfg.max_steps):
            train_loader.set_epoch(state.epoch)
            try:
                train_one_epoch(model, raw, train_loader, optimizer, scaler, cfg, state, d, log, stop_flag)
            except torch.OutOfMemoryError:
                raise SystemExit(f"error: out of memory at batch size {cfg.batch_size} per process "
                                 f"({cfg.arch} {cfg.pattern}, image size {cfg.image_size}); try "
                                 f"--batch-size {max(cfg.batch_size // 2, 1)} (with --accum-steps 2 to keep the "
                                 "global batch)") from None
            epoch_done = state.batch_in_epoch >= len(train_loader)
            if epoch_done:
                state.epoch += 1
                state.batch_in_epoch = 0
            final = state.epoch >= cfg.epochs or (cfg.max_steps and state.step >= cfg.max_steps)
            if (epoch_done and state.epoch % cfg.eval_every == 0) or final:
                result = evaluate(model, val_loader, cfg, d)
                log({"epoch": state.epoch, "step": state.step, **result}, kind="eval")
                if d.main and result["top1"] > state.best_top1:
                    state.best_top1 = result["top1"]
                    save_checkpoint(out / "best.pt", raw, optimizer, scaler, cfg, state)
            if d.main:
                save_checkpoint(out / "last.pt", raw, optimizer, scaler, cfg, state)
    except Stop as stop:
        log.close()
        if "signal" in stop_flag:
            if d.main:
                save_checkpoint(out / "last.pt", raw, optimizer, scaler, cfg, state)
            print(f"\ncollab_fast: {stop}; wrote {out / 'last.pt'} at step {state.step} "
                  f"(continue with --resume auto)", file=sys.stderr)
            code = 128 + getattr(signal, stop_flag["signal"])
            _cleanup(d)
            sys.exit(code)
        _cleanup(d)
        raise SystemExit(f"error: {stop}") from None
    finally:
        for sig, h in handlers.items():
            signal.signal(sig, h)
    if d.main:
        net = raw.export_head(0) if hasattr(raw, "export_head") else raw
        save_atomic(net.state_dict(), out / "head0.pth")
        if result:
            heads = " ".join(f"{a:.2f}%" for a in result["top1_heads"])
            print(f"collab_fast: done at step {state.step}: top-1 per head [{heads}], head 0 {result['top1']:.2f}% "
                  f"(chance {100 / num_classes:.1f}%); exported head 0 to {out / 'head0.pth'}")
    log.close()
    _cleanup(d)
    return result


def _cleanup(d: Dist) -> None:
    if d.world > 1 and dist.is_initialized():
        # Every rank reaches the teardown before any destroys: without this barrier, gloo on CPU
        # (torch 2.13) intermittently aborts a worker at exit ("terminate called without an active exception").
        dist.barrier()
        dist.destroy_process_group()


def main(argv=None) -> int:
    cfg = parse_config(argv)
    try:
        run(cfg)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
