"""Train a collaborative network: `python -m collab_fast.train DATASET --arch resnet50 --pattern hier4`.

One process per GPU under torchrun (DistributedDataParallel, NCCL; gloo on CPU), or one process alone.
Every pattern trains with the fused collaborative loss (single = one head = plain cross-entropy). The hot
path has no host synchronisation: losses, accuracy and the non-finite flag accumulate on the device and
are read at log intervals. Outputs in --output: config.json, metrics.jsonl, TensorBoard events,
last.pt / best.pt (atomic, checksummed), and head0.pth (the exported single network) at the end.

This file holds the epoch loop, evaluation and the run. Each settings section builds what it configures
(DataConfig.build: loaders and the batch transform; ModelConfig.build: the wrapped training model;
OptimConfig.build and optim.Schedule: optimizer, scaler, per-step schedules; RunConfig.resume_path); the
step is in step.py, the run's persistent state in run_state.py, reporting in metrics.py.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from collab_fast.checkpoint import CheckpointError, load_checkpoint, os_error_line, save_atomic, write_text_atomic
from collab_fast.config import TrainConfig, parse_config, resolve
from collab_fast.data import Data, TorchFolderLoader, data_channels
from collab_fast.distributed import Dist, cleanup, init_distributed
from collab_fast.ema import ModelEMA
from collab_fast.extension import ExtensionError
from collab_fast.extras import MissingExtra
from collab_fast.graphs import CapturedStep
from collab_fast.health import finite_model, finite_number
from collab_fast.kernels.collab_loss import collab_loss
from collab_fast.metrics import Logger, Meter, Progress, memory_stats
from collab_fast.models import ARCHS, as_heads, input_channels
from collab_fast.models.cost import pattern_cost
from collab_fast.optim import Schedule
from collab_fast.run_state import RunDir, State, agree_on_resume, restore, snapshot
from collab_fast.scaler import LossScaler
from collab_fast.seeding import seed_everything
from collab_fast.step import AMP_DTYPES, Step

__all__ = ["Step", "TrainConfig", "evaluate", "main", "parse_config", "run"]

# How a collaborative copy runs the network (CollabNet.split_by), in the start-up line.
_SPLIT_BY = {"children": " (its children run in order)", "graph": " (its traced graph cut there: torch.fx)"}


class Stop(Exception):
    """Ends the run cleanly (a signal, a non-finite loss)."""


@dataclass
class Run:
    """Everything one training run holds, passed to the loop as one value."""

    cfg: TrainConfig  # resolved: final
    proc: Dist  # this process's place: rank, world size, main
    device: torch.device
    rundir: RunDir  # the claimed --output folder
    loaders: Data  # loaders, classes, the training batch's device-side transform
    net: torch.nn.Module  # the bare model: state dicts, export, num_heads
    model: torch.nn.Module  # what runs the forward pass (DDP / compile wrapped)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | LossScaler | None  # --amp fp16 (LossScaler: --compile-step)
    ema: ModelEMA | None  # --model-ema: the weights' moving average
    schedule: Schedule  # the LR and the soft factor per step
    train_step: Step | CapturedStep  # one optimizer step (state.step counts them); --cuda-graphs: captured
    meter: Meter  # the training sums of one log interval, on the device (one for the run: a captured step adds into it)
    state: State
    log: Logger
    progress: Progress
    steps_per_epoch: int
    total_steps: int
    resumed_from: Path | None = None
    signal: str | None = None  # set by SIGINT / SIGTERM

    @property
    def out(self) -> Path:
        return self.rundir.path

    def save(self, name: str) -> None:
        # Called on every rank: image-folder loaders gather each rank's reader position (a collective).
        position = self.loaders.train.state_dict()
        self.state.loader_state = self.proc.gather(position) if position else []
        if self.proc.main:
            snapshot(self.out / name, self.net, self.optimizer, self.scaler, self.cfg.to_dict(), self.state, self.ema)


def train_one_epoch(r: Run, loader) -> None:
    cfg, state, device = r.cfg, r.state, r.device
    meter = r.meter
    meter.reset()
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
        if r.loaders.transform is not None:
            x, y = r.loaders.transform(x, y, state.step)  # y: [N, C] probabilities where mixed
        lr = r.schedule.lr(state.step)
        r.train_step.set_lr(lr)
        if r.schedule.ramps_soft:
            r.train_step.set_soft_factor(r.schedule.soft(state.step))
        r.train_step(x, y, meter)  # the EMA's update included
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


def _summary(r: Run) -> str:
    res = r.state.last_eval
    if not res:
        return f"collab_fast: done at step {r.state.step}"
    heads = " ".join(f"{a:.2f}%" for a in res["top1_heads"])
    return (f"collab_fast: done at step {r.state.step}: top-1 per head [{heads}], head 0 {res['top1']:.2f}% "
            f"(chance {100 / r.loaders.num_classes:.1f}%); head 0 exported to {r.out / 'head0.pth'}")


def _setup(flags: TrainConfig) -> Run:
    """Device, process group, run folder, data, model, optimizer, resumed state: everything the loop needs.
    The config is resolved (flags + device + the resumed checkpoint's settings) before anything is built."""
    proc, device = init_distributed(flags.run.device, capture=flags.model.cuda_graphs)
    cfg = resolve(flags, cuda=device.type == "cuda", world=proc.world)
    rundir = RunDir(cfg.run.output, resume=bool(cfg.run.resume), overwrite=cfg.run.overwrite, main=proc.main)
    try:
        return _setup_in(flags, cfg, proc, device, rundir)
    except BaseException:  # a refused resume, bad data, ...: the run folder is not left claimed
        rundir.close()
        raise


def _setup_in(flags: TrainConfig, cfg: TrainConfig, proc: Dist, device: torch.device, rundir: RunDir) -> Run:
    """_setup's part inside the claimed run folder."""
    seed_everything(cfg.run.seed, proc.rank)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    resume_path = cfg.run.resume_path(rundir.path, weights=cfg.model.weights)
    agree_on_resume(proc, resume_path)
    ckpt = load_checkpoint(resume_path) if resume_path else None
    if ckpt is not None:  # its settings join the resolution (the LR milestones it was trained with)
        fresh, cfg = cfg, resolve(flags, cuda=device.type == "cuda", world=proc.world, resumed=ckpt["config"])
        if cfg.optim.lr_milestones != fresh.optim.lr_milestones and proc.main:
            print(f"collab_fast: keeping the checkpoint's LR milestones {cfg.optim.lr_milestones} (the defaults for "
                  f"--epochs {cfg.optim.epochs} would differ); pass --lr-milestones to set others", file=sys.stderr)
    in_chans = input_channels(cfg.model.arch, data_channels(cfg.data.dataset))
    loaders = cfg.data.build(batch_size=cfg.optim.batch_size, device=device, rank=proc.rank, world=proc.world,
                             seed=cfg.run.seed, dtype=torch.float16 if cfg.optim.amp == "fp16" else torch.float32,
                             channels_last=cfg.model.channels_last, channels=in_chans)
    if len(loaders.train) == 0:
        raise ValueError(f"--batch-size {cfg.optim.batch_size} is larger than the training set's share of each process: "
                         "no full batch per epoch; lower --batch-size")
    net, model = cfg.model.build(loaders.num_classes, device=device, proc=proc, image_size=cfg.data.image_size,
                                 in_chans=in_chans)
    optimizer, scaler = cfg.optim.build(net, device, capturable=cfg.model.cuda_graphs, compiled=cfg.model.compile_step)
    ema = ModelEMA(net, cfg.optim.model_ema) if cfg.optim.model_ema else None
    state = (restore(resume_path, net, optimizer, scaler, cfg.model.arch, cfg.model.pattern, ema=ema,
                     opt=cfg.optim.optimizer, ckpt=ckpt) if ckpt is not None else State())
    agree_on_resume(proc, resume_path, state.step)
    if state.loader_state and len(state.loader_state) == proc.world:
        loaders.train.load_state_dict(state.loader_state[proc.rank])
    elif state.loader_state and proc.main:
        print(f"collab_fast: warning: the checkpoint was written by {len(state.loader_state)} processes, this run has "
              f"{proc.world}: the data order restarts from the seed (resume is not exact)", file=sys.stderr)
    steps = len(loaders.train)
    total = min(cfg.optim.epochs * steps, cfg.optim.max_steps or 1 << 62)
    schedule = Schedule(cfg.optim, steps)
    change = schedule.change_from(ckpt["config"], state.step) if ckpt is not None else None
    if change and proc.main:
        print(f"collab_fast: warning: {change}", file=sys.stderr)
    progress = Progress(cfg.run.progress, total, state.step, cfg.run.progress_every, enabled=proc.main)
    log = Logger(rundir.path, proc.main, progress, record=not cfg.run.eval_only)
    step = Step(cfg, model, net, optimizer, scaler, proc, ema)
    if cfg.model.cuda_graphs:
        step = CapturedStep(step)
    r = Run(cfg, proc, device, rundir, loaders, net, model, optimizer, scaler, ema, schedule, step,
            Meter(net.num_heads, device), state, log, progress, steps, total, resume_path)
    if proc.main:
        _header(r)
    return r


def _header(r: Run) -> None:
    """What the run is, printed once at the start (and config.json, the record of how it was trained)."""
    cfg, net, out, total, steps = r.cfg, r.net, r.out, r.total_steps, r.steps_per_epoch
    num_classes, resume_path = r.loaders.num_classes, r.resumed_from
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
    if isinstance(r.loaders.train, TorchFolderLoader):
        print(f"collab_fast: images through the PyTorch loader ({r.loaders.train.threads} workers, Pillow "
              "decode on the CPU; slower than DALI: pip install 'collab_fast[dali]', or [dali-cuda12])")
    world = r.proc.world
    until = f" (stops at step {total}: --max-steps)" if optim.max_steps and total < optim.epochs * steps else ""
    print(f"collab_fast: {data.dataset} ({num_classes} classes), {steps} steps/epoch x {optim.epochs} epochs{until}, "
          f"global batch {optim.batch_size * world}, lr {optim.lr:g}, amp {optim.amp}, device {r.device}"
          f"{f', {world} processes' if world > 1 else ''}; output {out}"
          + (f"; resumed at step {r.state.step}" if resume_path else ""), flush=True)
    if isinstance(r.train_step, CapturedStep):
        how = ("a CUDA graph" if r.device.type == "cuda" else
               "an op tape (no CUDA: a rehearsal of the capture that replays the recorded ops, slower than eager)")
        print(f"collab_fast: --cuda-graphs: the step is captured in {how} after {r.train_step.warmup} eager warm-up "
              "steps", flush=True)


def run(cfg: TrainConfig) -> dict:
    """Trains (or evaluates) as `cfg` says; returns the last evaluation."""
    r = _setup(cfg)
    cfg, state = r.cfg, r.state
    try:
        if cfg.run.eval_only:
            res = evaluate(r.model, r.net, r.loaders.val, cfg, r.proc)
            rec = {"epoch": state.epoch + (state.batch_in_epoch > 0), "epochs": cfg.optim.epochs, "step": state.step, **res}
            r.log(rec, kind="eval")
            if r.proc.main:  # its own file: config.json and metrics.jsonl keep the record of the training
                write_text_atomic(r.out / "eval.json", json.dumps({"eval": rec, "config": cfg.to_dict()}, indent=1) + "\n")
            return res
        if state.step >= r.total_steps or state.epoch >= cfg.optim.epochs:
            r.progress.write(f"collab_fast: the run in {r.out} is already complete ({state.step} of {r.total_steps} "
                             "steps); nothing to train (raise --epochs or --max-steps to go on)")
        else:
            _train(r)
        if r.proc.main:
            if not finite_model(r.net):
                raise Stop("the final model is not finite; head0.pth is not written")
            save_atomic(r.net.export_head(0).state_dict(), r.out / "head0.pth")
            r.progress.close()
            print(_summary(r), flush=True)
        return state.last_eval
    except Stop as stop:
        r.progress.close()
        raise SystemExit(f"error: {stop}") from None
    finally:
        r.progress.close()
        r.log.close()
        r.rundir.close()
        cleanup(r.proc)


def _train(r: Run) -> None:
    cfg, state, train_loader = r.cfg, r.state, r.loaders.train

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
            _eval_and_save(r, r.loaders.val, epoch_done,
                           final=state.epoch >= cfg.optim.epochs or state.step >= r.total_steps)
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
