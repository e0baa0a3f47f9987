"""A run: the trainer's `run` section (RunConfig: its folder, resumption, seed, logging and devices), and its
persistent state: its output directory (claimed by one live run at a time), the training position and RNG
states, checkpoints written and restored. (Initial weights are the model section's, collab_fast.models.builder;
whether a model is still finite is collab_fast.health's.)"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from collab_fast.checkpoint import (
    FORMAT,
    CheckpointError,
    load_checkpoint,
    os_error_line,
    save_checkpoint,
)
from collab_fast.cli import check_fields, setting
from collab_fast.distributed import Dist
from collab_fast.recipes import RECIPES

__all__ = ["RunConfig", "RunDir", "State", "agree_on_resume", "restore", "snapshot"]

_RUN_FILES = ("metrics.jsonl", "config.json", "last.pt", "best.pt", "head0.pth", "tb")
# Every name the trainer writes in a run folder: none may be a symbolic link (a planted link would redirect
# a write, append or truncation to its target).
_WRITTEN = (".lock", *_RUN_FILES, "summary.csv", "eval.json")


@dataclass
class RunConfig:
    """Where the run lives, how it starts and what it reports: the trainer's `run` section."""

    recipe: str | None = setting(None, "a paper setting (see --list-recipes); explicit flags override it",
                                 choices=tuple(RECIPES))
    device: str = setting("auto", "where to train: auto (a CUDA device when present, one per process under torchrun), "
                                  "cuda, or cpu (also where a GPU exists)", choices=("auto", "cuda", "cpu"))
    output: str | None = setting(None, "run directory; unset: runs/<dataset>_<arch>_<pattern>", metavar="DIR")
    overwrite: bool = setting(False, "start over in an --output that holds an earlier run (its files are replaced)")
    resume: str | None = setting(None, "continue a run: auto (OUTPUT/last.pt if present) or a checkpoint PATH",
                                 metavar="auto|PATH")
    seed: int = setting(0, "random seed (weights, data order, augmentation, label noise)", lo=0, hi=2**63 - 1)
    eval_only: bool = setting(False, "evaluate --weights (or the resumed checkpoint) and exit")
    log_every: int = setting(50, "optimizer steps between log records (the hot path's only host syncs)", lo=1)
    eval_every: int = setting(1, "epochs between evaluations", lo=1)
    save_every: int | None = setting(None, "optimizer steps between mid-epoch last.pt checkpoints (long epochs); unset: "
                                           "at each epoch end only", lo=1)
    progress: str = setting("auto", "progress display: a bar on a terminal, a line every --progress-every seconds "
                                    "otherwise (auto), or forced", choices=("auto", "bar", "lines", "off"))
    progress_every: float = setting(30.0, "seconds between progress lines when output is not a terminal",
                                    lo=0, lo_open=True)

    def __post_init__(self):
        check_fields(self)
        if self.resume not in (None, "auto") and not Path(self.resume).is_file():
            raise ValueError(f"--resume {self.resume}: no such file (use --resume auto to continue OUTPUT/last.pt)")
        if self.overwrite and self.resume:
            raise ValueError("--overwrite starts over and --resume continues: give one of them")

    def resume_path(self, out: Path, *, weights: str | None = None) -> Path | None:
        """The checkpoint this run continues: OUTPUT/last.pt (--resume auto) or --resume PATH; None for a fresh
        run (no --resume, or auto with nothing to resume yet). `weights`: the model's --weights, which an
        --eval-only run evaluates when there is no checkpoint."""
        if not self.resume:
            return None
        path = out / "last.pt" if self.resume == "auto" else Path(self.resume)
        if self.eval_only and not path.exists() and not weights:
            raise ValueError(f"--eval-only --resume {self.resume}: {path} does not exist, and evaluating an "
                             "untrained network means nothing; give --weights PATH or an existing checkpoint")
        return path if path.exists() else None


@dataclass
class State:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # epochs completed; the epoch being trained is epoch + 1 in every printed line
    batch_in_epoch: int = 0  # batches of the current epoch already consumed
    best_top1: float = -1.0
    skipped: int = 0  # non-finite steps skipped (--skip-nonfinite)
    last_eval: dict = field(default_factory=dict)  # the latest evaluation (the final summary on resume)
    loader_state: list = field(default_factory=list)  # per rank: the training loader's position (DALI), or []


class RunDir:
    """The --output directory, held by one live run at a time through an flock on OUTPUT/.lock (the
    kernel releases it if the run dies). A directory with an earlier run needs --resume or --overwrite."""

    def __init__(self, path: str, *, resume: bool, overwrite: bool, main: bool):
        self.path = Path(path)
        self.fd = None
        if not main:
            return
        if self.path.exists() and not self.path.is_dir():
            raise CheckpointError(f"--output {self.path} is a file; give a directory")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CheckpointError(f"--output {self.path}: cannot create the run directory ({exc.strerror})") from None
        _refuse_links(self.path)
        try:
            # O_NOFOLLOW: a link planted after the check is not followed either (ELOOP)
            self.fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise CheckpointError(_link_message(self.path / ".lock")) from None
            raise CheckpointError(f"--output {self.path}: cannot create the run directory ({exc.strerror})") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(self.fd, 100, 0).decode(errors="replace").strip() or "another process"
            self.close()
            raise CheckpointError(f"--output {self.path} is in use by a live run ({owner}); wait for it to end or "
                                  "choose another --output") from None
        try:
            self._claim(resume, overwrite)
        except OSError as exc:  # a full disk or a read-only folder while the directory is claimed
            self.close()
            raise CheckpointError(f"--output {self.path}: cannot claim the run directory "
                                  f"({os_error_line(exc)})") from None
        except BaseException:
            self.close()  # a refused directory is not left locked by this process
            raise

    def _claim(self, resume: bool, overwrite: bool) -> None:
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"process {os.getpid()}".encode(), 0)
        for tmp in self.path.glob(".*.tmp"):  # temp files of saves that were killed (we hold the lock)
            tmp.unlink(missing_ok=True)
        earlier = [n for n in _RUN_FILES if (self.path / n).exists()]
        if earlier and overwrite:
            for n in earlier:
                p = self.path / n
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        elif earlier and not resume:
            raise CheckpointError(f"--output {self.path} holds an earlier run ({', '.join(earlier)}): add --resume auto "
                                  "to continue it or --overwrite to start over")

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _link_message(p: Path) -> str:
    try:
        target = f" (to {os.readlink(p)})"
    except OSError:
        target = ""
    return (f"--output {p.parent}: {p.name} there is a symbolic link{target}; the trainer writes its run files "
            "itself, never through links: remove it, or choose another --output")


def _refuse_links(folder: Path) -> None:
    for name in _WRITTEN:
        if (folder / name).is_symlink():
            raise CheckpointError(_link_message(folder / name))


def _rng_state() -> dict:
    # Plain lists and tuples: what torch.load(weights_only=True) accepts besides tensors.
    name, keys, pos, has_gauss, cached = np.random.get_state()
    s = {"torch": torch.get_rng_state(), "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
         "python": random.getstate()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    name, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = s["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def snapshot(path: Path, net, optimizer, scaler, config: dict, state: State, ema=None) -> None:
    """Writes a training checkpoint (atomic, checksummed); `ema`: the --model-ema average, under "ema"."""
    save_checkpoint({
        "format": FORMAT,
        "model": net.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "config": config,
        "state": dataclasses.asdict(state),
        "rng": _rng_state(),
        **({"ema": ema.state_dict()} if ema is not None else {}),
    }, path)


def restore(path: Path, net, optimizer, scaler, arch: str, pattern: str, config_out: dict | None = None,
            ema=None, opt: str | None = None, ckpt: dict | None = None) -> State:
    """Loads a checkpoint into the model, optimizer, scaler, RNGs and the --model-ema average (started from
    the loaded weights when the checkpoint has none); returns the training position (and puts the
    checkpoint's resolved config into config_out, when given). `opt`: this run's --opt, which must be the
    checkpoint's (another optimizer's state does not fit)."""
    ckpt = load_checkpoint(path) if ckpt is None else ckpt  # (read already: RunConfig.resumed)
    cfg = ckpt["config"]
    if config_out is not None and isinstance(cfg, dict):
        config_out.update(cfg)
    if cfg.get("arch") != arch or cfg.get("pattern") != pattern:
        raise CheckpointError(f"{path} is a {cfg.get('arch')} {cfg.get('pattern')} run, not {arch} {pattern}")
    if opt is not None and cfg.get("opt") != opt:
        raise CheckpointError(f"{path} was trained with --opt {cfg.get('opt')}, this run asks for --opt {opt}: "
                              f"resume with --opt {cfg.get('opt')}, or start a new run from its weights "
                              f"(--weights {path}, without --resume)")
    try:
        net.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        known = {f.name for f in dataclasses.fields(State)}
        unknown = sorted(set(ckpt["state"]) - known)
        if unknown:
            raise ValueError(f"unknown training-state keys {unknown} (written by a newer collab_fast?)")
        state = State(**ckpt["state"])
        _set_rng_state(ckpt["rng"])
        if ema is not None:
            ema.load_state_dict(ckpt["ema"] if ckpt.get("ema") else net.state_dict())
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path} does not fit this run: {first}") from None
    return state


def agree_on_resume(proc: Dist, path: Path | None, step: int | None = None) -> None:
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
