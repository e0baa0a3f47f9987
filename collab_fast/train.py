"""Train a collaborative network: `python -m collab_fast.train DATASET --arch resnet50 --pattern hier4`.

One process per GPU under torchrun (DistributedDataParallel, NCCL; gloo on CPU), or one process alone.
Every pattern trains with the fused collaborative loss (single = one head = plain cross-entropy). The hot
path has no host synchronisation: losses, accuracy and the non-finite flag accumulate on the device and
are read at log intervals. Outputs in --output: config.json, metrics.jsonl, TensorBoard events,
last.pt / best.pt (atomic, checksummed), and head0.pth (the exported single network) at the end.

This file holds the step, the epoch loop, evaluation and the run; configuration is in config.py, the
run's persistent state in run_state.py, process groups in distributed.py, reporting in metrics.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from collab_fast.checkpoint import CheckpointError, is_checkpoint, load_file, os_error_line, save_atomic, write_text_atomic
from collab_fast.config import TrainConfig, parse_config, resolve
from collab_fast.data import (
    AutoAugment,
    BatchMix,
    Loader,
    RandomErase,
    TorchFolderLoader,
    build_loaders,
    data_channels,
    normalization,
)
from collab_fast.distributed import Dist, cleanup, init_distributed
from collab_fast.ema import ModelEMA
from collab_fast.extension import ExtensionError
from collab_fast.extras import MissingExtra
from collab_fast.health import finite_model, finite_number
from collab_fast.kernels.collab_loss import collab_loss
from collab_fast.metrics import Logger, Meter, Progress, memory_stats
from collab_fast.models import ARCHS, as_heads, build_model, check_input_size, input_channels
from collab_fast.models.cost import pattern_cost
from collab_fast.optim import lr_factor, make_optimizer, soft_factor
from collab_fast.run_state import RunDir, State, load_weights, restore, snapshot
from collab_fast.seeding import seed_numpy, torch_seed

__all__ = ["Step", "TrainConfig", "evaluate", "main", "parse_config", "run"]

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


# How a collaborative copy runs the network (CollabNet.split_by), in the start-up line.
_SPLIT_BY = {"children": " (its children run in order)", "graph": " (its traced graph cut there: torch.fx)"}

def seed_everything(seed: int, rank: int) -> None:
    random.seed(seed + rank)
    seed_numpy(seed + rank)
    torch.manual_seed(torch_seed(seed))  # the same initial weights on every rank


def _initial_weights(cfg: TrainConfig) -> tuple[dict | None, object]:
    """--weights PATH, read once: (the state dict for every copy, what load_weights loads as it is). A plain
    network's (an exported head) for a collaborative pattern goes into every copy through build (the
    classifier re-initialised per head); a training checkpoint, or pattern single, is loaded whole after."""
    if not cfg.model.weights or cfg.model.pretrained:
        return None, None
    obj = load_file(cfg.model.weights)
    if cfg.model.pattern == "single" or is_checkpoint(obj):
        return None, obj  # the model as it is (a training checkpoint of this very model: load_weights)
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"--weights {cfg.model.weights}: expected a state dict of tensors, found a "
                              f"{type(obj).__name__}")
    return obj, None


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


class Stop(Exception):
    """Ends the run cleanly (a signal, a non-finite loss)."""


@dataclass
class Run:
    """Everything one training run holds, passed to the loop as one value."""

    cfg: TrainConfig
    proc: Dist  # this process's place: rank, world size, main
    device: torch.device
    net: torch.nn.Module  # the bare model: state dicts, export, num_heads
    model: torch.nn.Module  # what runs the forward pass (DDP / compile wrapped)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    train_step: Step  # one optimizer step (state.step counts them)
    state: State
    log: Logger
    progress: Progress
    out: Path
    steps_per_epoch: int
    total_steps: int
    train_loader: Loader
    mix: BatchMix | None = None  # --mixup / --cutmix: the batch and its labels mixed on the device
    ema: ModelEMA | None = None  # --model-ema: the weights' moving average
    augment: AutoAugment | None = None  # --auto-augment, on the device, first
    erase: RandomErase | None = None  # --random-erase, on the device, before the mixing
    signal: str | None = None  # set by SIGINT / SIGTERM

    def save(self, name: str) -> None:
        # Called on every rank: image-folder loaders gather each rank's reader position (a collective).
        position = self.train_loader.state_dict()
        self.state.loader_state = self.proc.gather(position) if position else []
        if self.proc.main:
            snapshot(self.out / name, self.net, self.optimizer, self.scaler, self.cfg.to_dict(), self.state, self.ema)


def train_one_epoch(r: Run, loader) -> None:
    cfg, state, device = r.cfg, r.state, r.device
    meter = Meter(r.net.num_heads, device)
    first_bad = torch.full((), -1, dtype=torch.int64, device=device)  # first non-finite step, on the device
    skipped = torch.zeros((), dtype=torch.int64, device=device)
    r.model.train()
    batches = iter(loader.iter_from(state.batch_in_epoch))
    while True:
        # The signal is looked at before the next batch is fetched: a reader (DALI) advanced past a batch that
        # was never trained on would save a position one batch ahead, and the resumed run would skip it.
        if r.signal and r.proc.world == 1:
            raise Stop(f"received {r.signal}")
        try:
            x, y = next(batches)
        except StopIteration:
            break
        if r.augment is not None:
            x = r.augment(x, state.step)
        if r.erase is not None:
            x = r.erase(x, state.step)
        if r.mix is not None:
            x, y = r.mix(x, y, state.step)  # y: [N, C] probabilities
        lr = cfg.optim.lr * lr_factor(cfg.optim, state.step, r.steps_per_epoch)
        for g in r.optimizer.param_groups:
            g["lr"] = lr
        if cfg.optim.soft_ramp:
            r.train_step.set_soft_factor(soft_factor(cfg.optim, state.step, r.steps_per_epoch))
        r.train_step(x, y, meter)
        if r.ema is not None:
            r.ema.update(r.train_step.bad)  # a skipped step leaves the average as it was
        bad = r.train_step.bad.bool()  # agreed across ranks
        first_bad = torch.where(bad & (first_bad < 0), state.step, first_bad)
        skipped += bad
        state.step += 1
        state.batch_in_epoch += 1
        meter.step_done(x.shape[0])
        r.progress.update(state.epoch + 1, cfg.optim.epochs, state.step, x.shape[0] * r.proc.world)
        last = state.batch_in_epoch >= r.steps_per_epoch or state.step >= r.total_steps
        due_log = state.step % cfg.run.log_every == 0 or last
        due_save = bool(cfg.run.save_every) and state.step % cfg.run.save_every == 0 and not last
        # under torchrun a signal seen by one rank is acted on by all, at the next check (every 10 steps at most)
        due_agree = r.proc.world > 1 and state.step % _AGREE_EVERY == 0
        if due_log or due_save or due_agree or last:
            _check_steps(r, first_bad, skipped)  # the only host sync of the loop
        if due_log:
            rec = meter.read(r.proc)
            rec.update(step=state.step, epoch=state.epoch + 1, epochs=cfg.optim.epochs, lr=lr, skipped_steps=state.skipped,
                       eta_s=(r.total_steps - state.step) * rec["sec_per_step"], **memory_stats(device))
            r.log(rec, kind="train")
            meter.reset()
        if due_save:
            if not finite_model(r.net):
                raise Stop(f"the model diverged at step {state.step} (non-finite weights); the last good checkpoint "
                           "is kept")
            r.save("last.pt")
        if state.step >= r.total_steps:
            return


_AGREE_EVERY = 10  # steps between the ranks' agreement on a signal (one tiny all-reduce and a host sync)


def _check_steps(r: Run, first_bad: torch.Tensor, skipped: torch.Tensor) -> None:
    """Waits for the device, then stops at a non-finite step (or counts it under --skip-nonfinite), or at a
    signal that any rank received (every rank then stops at the same step)."""
    if r.device.type == "cuda":
        torch.cuda.synchronize(r.device)
    if r.proc.world > 1:
        flag = torch.tensor([1.0 if r.signal else 0.0], device=r.device)
        r.proc.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and not r.signal:
            r.signal = "SIGTERM"  # another rank's: stop together, checkpoint together
        if r.signal:
            raise Stop(f"received {r.signal}")
    if int(first_bad) >= 0 and not r.cfg.optim.skip_nonfinite:
        raise Stop(f"non-finite loss at step {int(first_bad) + 1} (epoch {r.state.epoch + 1}); the run stops and keeps "
                   "the last good checkpoint (--skip-nonfinite skips such steps instead)")
    r.state.skipped += int(skipped)
    skipped.zero_()


@torch.no_grad()
def evaluate(model, net, loader, cfg: TrainConfig, proc: Dist) -> dict:
    """Top-1/top-5 of head 0 (the paper's number), of every head and of the mean-logit ensemble; head 0's
    plain cross-entropy (comparable across patterns) and the collaborative loss (summed over heads)."""
    device = next(net.parameters()).device
    heads = net.num_heads
    amp = AMP_DTYPES.get(cfg.optim.amp)
    model.eval()
    top1 = torch.zeros(heads + 1, device=device, dtype=torch.float64)  # heads..., ensemble
    top5 = torch.zeros(heads + 1, device=device, dtype=torch.float64)
    hard, total, count = (torch.zeros((), device=device, dtype=torch.float64) for _ in range(3))
    for x, y in loader:
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            logits = as_heads(model(x))
        logits = logits.float()
        loss, stats = collab_loss(logits, y, cfg.loss, return_stats=True)
        both = torch.cat([logits, logits.mean(0, keepdim=True)])  # [H + 1, N, C]
        pred = both.topk(min(5, both.shape[-1]), dim=-1).indices  # [H + 1, N, k]
        hit = pred == y[None, :, None]
        top1 += hit[..., 0].sum(1)
        top5 += hit.any(-1).sum(1)
        n = stats.num_valid.double()
        hard += stats.hard[0].double() * n
        total += loss.double() * n
        count += n
    t = proc.all_reduce(torch.cat([top1, top5, hard[None], total[None], count[None]])).cpu().tolist()
    n, h = max(t[-1], 1.0), heads + 1
    acc1, acc5 = [100 * v / n for v in t[:h]], [100 * v / n for v in t[h : 2 * h]]
    return {"top1": acc1[0], "top5": acc5[0], "top1_heads": acc1[:-1], "top5_heads": acc5[:-1],
            "top1_ensemble": acc1[-1], "top5_ensemble": acc5[-1], "val_loss_head0": t[2 * h] / n,
            "val_loss": t[2 * h + 1] / n, "val_samples": int(t[-1])}


def _eval_and_save(r: Run, val_loader, epoch_done: bool, final: bool) -> None:
    """Evaluates when due; a non-finite evaluation or model never becomes a checkpoint."""
    if (epoch_done and r.state.epoch % r.cfg.run.eval_every == 0) or final:
        result = evaluate(r.model, r.net, val_loader, r.cfg, r.proc)
        # 1-based: the epoch just finished, or the one an early stop (--max-steps) ended in
        epoch = r.state.epoch + (r.state.batch_in_epoch > 0)
        if r.ema is not None:  # the average, evaluated the same way: keys ema_top1, ema_val_loss, ...
            averaged = evaluate(r.ema.module, r.ema.module, val_loader, r.cfg, r.proc)
            result.update({f"ema_{k}": v for k, v in averaged.items()})
        r.log({"epoch": epoch, "epochs": r.cfg.optim.epochs, "step": r.state.step, **result}, kind="eval")
        if not (finite_number(result["val_loss"]) and finite_model(r.net)):
            raise Stop(f"the model diverged at step {r.state.step} (non-finite evaluation loss or weights); the "
                       "last good checkpoint is kept (try a lower --lr)")
        r.state.last_eval = result
        if result["top1"] > r.state.best_top1:
            r.state.best_top1 = result["top1"]
            r.save("best.pt")
    elif not finite_model(r.net):
        raise Stop(f"the model diverged at step {r.state.step} (non-finite weights); the last good checkpoint is kept")
    r.save("last.pt")


def _summary(r: Run, num_classes: int) -> str:
    res = r.state.last_eval
    if not res:
        return f"collab_fast: done at step {r.state.step}"
    heads = " ".join(f"{a:.2f}%" for a in res["top1_heads"])
    return (f"collab_fast: done at step {r.state.step}: top-1 per head [{heads}], head 0 {res['top1']:.2f}% "
            f"(chance {100 / num_classes:.1f}%); head 0 exported to {r.out / 'head0.pth'}")


def sync_batchnorm(net: torch.nn.Module, proc: Dist, device: torch.device) -> torch.nn.Module:
    """--sync-bn: batch-norm statistics over the global batch (torch's SyncBatchNorm, GPUs only). The state
    dict keeps its names, so checkpoints and exported heads are those of plain batch norm."""
    if proc.world == 1:
        if proc.main:
            print("collab_fast: --sync-bn has nothing to synchronise in a single process; plain batch norm",
                  file=sys.stderr)
        return net
    if device.type != "cuda":
        raise ValueError("--sync-bn needs CUDA devices (torch's SyncBatchNorm does not run on CPU); drop it")
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)


def _agree_on_resume(proc: Dist, path: Path | None, step: int | None = None) -> None:
    """Every rank must resume from the same checkpoint (and, once loaded, the same step): a node that cannot
    see it (no shared file system) would start afresh while the others continue, and the first collective
    would hang. Refused on every rank in one line instead."""
    if proc.world == 1:
        return
    if step is None:  # before loading: does every rank have a checkpoint to resume from?
        seen = proc.gather(str(path) if path is not None else None)
        lacking = [r for r, p in enumerate(seen) if p is None]
        if lacking and len(lacking) < proc.world:
            where = next(p for p in seen if p is not None)
            raise CheckpointError(f"--resume: rank(s) {', '.join(map(str, lacking))} of {proc.world} cannot see "
                                  f"{where} (no shared file system?); put the checkpoint where every node reads it, "
                                  "or give --resume PATH to a copy on every node")
        return
    steps = proc.gather(step)
    if any(s != steps[0] for s in steps):
        each = ", ".join(f"rank {r}: step {s}" for r, s in enumerate(steps))
        raise CheckpointError(f"--resume: the ranks loaded different checkpoints ({each}); give every node the same one")


def _setup(cfg: TrainConfig):
    """Device, process group, data, model, optimizer, resumed state: everything the loop needs."""
    proc, device = init_distributed(cfg.run.device)
    default_milestones = cfg.optim.schedule == "step" and not cfg.optim.lr_milestones
    cfg = resolve(cfg, cuda=device.type == "cuda", world=proc.world)
    rundir = RunDir(cfg.run.output, resume=bool(cfg.run.resume), overwrite=cfg.run.overwrite, main=proc.main)
    try:
        return _setup_in(cfg, proc, device, rundir, default_milestones)
    except BaseException:  # a refused resume, bad data, ...: the run folder is not left claimed
        rundir.close()
        raise


def _setup_in(cfg: TrainConfig, proc: Dist, device: torch.device, rundir: RunDir, default_milestones: bool):
    """_setup's part inside the claimed run folder."""
    out = rundir.path
    seed_everything(cfg.run.seed, proc.rank)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    resume_path = None
    if cfg.run.resume:
        resume_path = out / "last.pt" if cfg.run.resume == "auto" else Path(cfg.run.resume)
        if cfg.run.eval_only and not resume_path.exists() and not cfg.model.weights:
            raise ValueError(f"--eval-only --resume {cfg.run.resume}: {resume_path} does not exist, and evaluating an "
                             "untrained network means nothing; give --weights PATH or an existing checkpoint")
        resume_path = resume_path if resume_path.exists() else None  # auto with nothing to resume: a fresh run
        _agree_on_resume(proc, resume_path)
    in_chans = input_channels(cfg.model.arch, data_channels(cfg.data.dataset))
    train_loader, val_loader, num_classes = build_loaders(
        cfg.data, batch_size=cfg.optim.batch_size, device=device, rank=proc.rank, world=proc.world, seed=cfg.run.seed,
        dtype=torch.float16 if cfg.optim.amp == "fp16" else torch.float32, channels_last=cfg.model.channels_last,
        channels=in_chans)
    if len(train_loader) == 0:
        raise ValueError(f"--batch-size {cfg.optim.batch_size} is larger than the training set's share of each process: "
                         "no full batch per epoch; lower --batch-size")
    cfg.data.num_classes = num_classes
    copies, whole = _initial_weights(cfg)
    net = build_model(cfg.model, num_classes, device, copies, in_chans=in_chans)
    check_input_size(net, cfg.model.arch, cfg.data.image_size, in_chans)
    if whole is not None:
        load_weights(net, cfg.model.weights, whole)
    net = sync_batchnorm(net, proc, device) if cfg.model.sync_bn else net
    optimizer = make_optimizer(net, cfg.optim)
    scaler = torch.amp.GradScaler(device.type) if cfg.optim.amp == "fp16" else None
    ema = ModelEMA(net, cfg.optim.model_ema) if cfg.optim.model_ema else None
    saved_cfg: dict = {}
    state = (restore(resume_path, net, optimizer, scaler, cfg.model.arch, cfg.model.pattern, saved_cfg, ema,
                     opt=cfg.optim.optimizer) if resume_path else State())
    _agree_on_resume(proc, resume_path, state.step)
    old = saved_cfg.get("lr_milestones")
    if default_milestones and old and saved_cfg.get("schedule") == "step" and old != cfg.optim.lr_milestones:
        # the defaults follow --epochs: a run continued to more epochs keeps the steps it was trained with
        cfg.optim.lr_milestones = [float(m) for m in old]
        if proc.main:
            print(f"collab_fast: keeping the checkpoint's LR milestones {old} (the defaults for --epochs "
                  f"{cfg.optim.epochs} would differ); pass --lr-milestones to set others", file=sys.stderr)
    if state.loader_state and len(state.loader_state) == proc.world:
        train_loader.load_state_dict(state.loader_state[proc.rank])
    elif state.loader_state and proc.main:
        print(f"collab_fast: warning: the checkpoint was written by {len(state.loader_state)} processes, this run has "
              f"{proc.world}: the data order restarts from the seed (resume is not exact)", file=sys.stderr)
    model = net
    if proc.world > 1:
        ids = [proc.local_rank] if device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(net, device_ids=ids)
    if cfg.model.compile:
        model = torch.compile(model)
    steps = len(train_loader)
    total = min(cfg.optim.epochs * steps, cfg.optim.max_steps or 1 << 62)
    change = _schedule_change(cfg.optim, saved_cfg, state.step, steps) if resume_path else None
    if change and proc.main:
        print(f"collab_fast: warning: {change}", file=sys.stderr)
    progress = Progress(cfg.run.progress, total, state.step, cfg.run.progress_every, enabled=proc.main)
    r = Run(cfg, proc, device, net, model, optimizer, scaler, Step(cfg, model, net, optimizer, scaler, proc), state,
            Logger(out, proc.main, progress, record=not cfg.run.eval_only), progress, out, steps, total, train_loader,
            mix=BatchMix(num_classes, mixup=cfg.data.mixup, cutmix=cfg.data.cutmix, seed=cfg.run.seed, rank=proc.rank)
            if cfg.data.mixup or cfg.data.cutmix else None, ema=ema,
            erase=RandomErase(cfg.data.random_erase, seed=cfg.run.seed, rank=proc.rank) if cfg.data.random_erase else None,
            augment=AutoAugment(cfg.data.auto_augment, *normalization(cfg.data.dataset, in_chans), seed=cfg.run.seed,
                                rank=proc.rank) if cfg.data.auto_augment != "none" else None)
    if proc.main:
        _header(r, num_classes, resume_path)
    return r, rundir, train_loader, val_loader, num_classes


_SCHEDULE_KEYS = ("schedule", "epochs", "lr_milestones", "warmup_epochs", "lr")  # flat names = OptimConfig fields


def _schedule_change(optim, saved: dict, step: int, steps_per_epoch: int) -> str | None:
    """What a resumed run does to the learning rate at its first step when its schedule settings differ from
    the checkpoint's (a cosine schedule follows --epochs, so continuing to more epochs raises the LR): a
    sentence naming both values, or None when they agree."""
    try:
        old = dataclasses.replace(optim, **{k: saved[k] for k in _SCHEDULE_KEYS if k in saved})
        was = old.lr * lr_factor(old, step, steps_per_epoch)
    except (TypeError, ValueError):  # a checkpoint of a version that recorded other settings: nothing to compare
        return None
    now = optim.lr * lr_factor(optim, step, steps_per_epoch)
    if math.isclose(was, now, rel_tol=1e-9, abs_tol=0.0):
        return None
    why = [f"--{k.replace('_', '-')} {saved[k]} -> {getattr(optim, k)}" for k in _SCHEDULE_KEYS
           if k in saved and saved[k] != getattr(optim, k)]
    if optim.schedule == "cosine" and "epochs" in saved and saved["epochs"] != optim.epochs:
        why.append("a cosine schedule follows --epochs")
    return (f"the learning-rate schedule differs from the checkpoint's ({'; '.join(why) or 'its settings'}): "
            f"at step {step + 1} the learning rate becomes {now:.6g} where the checkpoint's schedule gives {was:.6g}; "
            "resume with the checkpoint's settings to continue its schedule")


def _header(r: Run, num_classes: int, resume_path: Path | None) -> None:
    """What the run is, printed once at the start (and config.json, the record of how it was trained)."""
    cfg, net, out, total, steps = r.cfg, r.net, r.out, r.total_steps, r.steps_per_epoch
    data, model, optim = cfg.data, cfg.model, cfg.optim
    if cfg.run.eval_only:  # --eval-only leaves the record of how the run was trained as it was
        split = f"{data.holdout} held-out training samples" if data.holdout else "its test split"
        print(f"collab_fast: evaluating {resume_path or model.weights} on {data.dataset} ({num_classes} classes, "
              f"{split}), device {r.device}; results to {out / 'eval.json'}", flush=True)
        return
    write_text_atomic(out / "config.json", json.dumps(cfg.to_dict(), indent=1) + "\n")
    if model.arch in ARCHS:
        cost = pattern_cost(model.arch, model.pattern, data.image_size, num_classes, data_channels(data.dataset))
        print(f"collab_fast: {cost.line()}")
    else:
        print(f"collab_fast: {model.arch} {model.pattern}: {getattr(net, 'num_heads', 1)} head(s), "
              f"{sum(p.numel() for p in net.parameters()) / 1e6:.2f}M params, split after "
              f"{getattr(net, 'splits', []) or 'nothing'}{_SPLIT_BY.get(getattr(net, 'split_by', None), '')}")
    if isinstance(r.train_loader, TorchFolderLoader):
        print(f"collab_fast: images through the PyTorch loader ({r.train_loader.threads} workers, Pillow "
              "decode on the CPU; slower than DALI: pip install 'collab_fast[dali]', or [dali-cuda12])")
    world = r.proc.world
    until = f" (stops at step {total}: --max-steps)" if optim.max_steps and total < optim.epochs * steps else ""
    print(f"collab_fast: {data.dataset} ({num_classes} classes), {steps} steps/epoch x {optim.epochs} epochs{until}, "
          f"global batch {optim.batch_size * world}, lr {optim.lr:g}, amp {optim.amp}, device {r.device}"
          f"{f', {world} processes' if world > 1 else ''}; output {out}"
          + (f"; resumed at step {r.state.step}" if resume_path else ""), flush=True)


def run(cfg: TrainConfig) -> dict:
    """Trains (or evaluates) as `cfg` says; returns the last evaluation."""
    r, rundir, train_loader, val_loader, num_classes = _setup(cfg)
    cfg, state = r.cfg, r.state
    try:
        if cfg.run.eval_only:
            res = evaluate(r.model, r.net, val_loader, cfg, r.proc)
            rec = {"epoch": state.epoch + (state.batch_in_epoch > 0), "epochs": cfg.optim.epochs, "step": state.step, **res}
            r.log(rec, kind="eval")
            if r.proc.main:  # its own file: config.json and metrics.jsonl keep the record of the training
                write_text_atomic(r.out / "eval.json", json.dumps({"eval": rec, "config": cfg.to_dict()}, indent=1) + "\n")
            return res
        if state.step >= r.total_steps or state.epoch >= cfg.optim.epochs:
            r.progress.write(f"collab_fast: the run in {r.out} is already complete ({state.step} of {r.total_steps} "
                             "steps); nothing to train (raise --epochs or --max-steps to go on)")
        else:
            _train(r, train_loader, val_loader)
        if r.proc.main:
            if not finite_model(r.net):
                raise Stop("the final model is not finite; head0.pth is not written")
            save_atomic(r.net.export_head(0).state_dict(), r.out / "head0.pth")
            r.progress.close()
            print(_summary(r, num_classes), flush=True)
        return state.last_eval
    except Stop as stop:
        r.progress.close()
        raise SystemExit(f"error: {stop}") from None
    finally:
        r.progress.close()
        r.log.close()
        rundir.close()
        cleanup(r.proc)


def _train(r: Run, train_loader, val_loader) -> None:
    cfg, state = r.cfg, r.state

    def on_signal(signum, _frame):
        r.signal = signal.Signals(signum).name

    handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while state.epoch < cfg.optim.epochs and state.step < r.total_steps:
            train_loader.set_epoch(state.epoch)
            try:
                train_one_epoch(r, train_loader)
            except torch.OutOfMemoryError:
                b = cfg.optim.batch_size
                raise Stop(f"out of memory at batch size {b} per process ({cfg.model.arch} {cfg.model.pattern}, image "
                           f"size {cfg.data.image_size}); try --batch-size {max(b // 2, 1)} (with --accum-steps 2 to "
                           "keep the global batch)") from None
            epoch_done = state.batch_in_epoch >= r.steps_per_epoch
            if epoch_done:
                state.epoch += 1
                state.batch_in_epoch = 0
            _eval_and_save(r, val_loader, epoch_done, final=state.epoch >= cfg.optim.epochs or state.step >= r.total_steps)
    except Stop as stop:
        if r.signal:
            r.progress.close()
            if finite_model(r.net):
                r.save("last.pt")  # on every rank (the loader positions are gathered); written by rank 0
                if r.proc.main:
                    print(f"\ncollab_fast: {stop}; wrote {r.out / 'last.pt'} at step {state.step} (continue with "
                          "--resume auto)", file=sys.stderr)
            else:
                print(f"\ncollab_fast: {stop}; the model is not finite, so the last good checkpoint is kept",
                      file=sys.stderr)
            # Alone: the shell's convention, 128 + the signal. Under torchrun every rank stopped together and
            # last.pt is written: 0, so torchrun ends quietly (a failure would print its traceback and, with
            # --max-restarts, start the workers again over the run folder).
            raise SystemExit(0 if "TORCHELASTIC_RUN_ID" in os.environ else 128 + getattr(signal, r.signal)) from None
        raise
    finally:
        for sig, h in handlers.items():
            signal.signal(sig, h)


def main(argv=None) -> int:
    cfg = parse_config(argv)
    try:
        run(cfg)
    except (CheckpointError, FileNotFoundError, ValueError, MissingExtra, ExtensionError) as exc:
        print(f"error: {str(exc).removeprefix('collab_fast: ')}", file=sys.stderr)
        return 2
    except OSError as exc:  # the environment (a full disk, a read-only folder, a vanished mount): one line
        print(f"error: {os_error_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C before training started (scanning data, building the extension)
        print("collab_fast: interrupted during setup, before the first step (no checkpoint was written)",
              file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as exc:
        if not isinstance(exc, MemoryError) and "can't allocate memory" not in str(exc):
            raise
        print(f"error: out of host memory ({cfg.model.arch} {cfg.model.pattern}, batch size {cfg.optim.batch_size}); "
              "try a smaller --batch-size or --image-size", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
