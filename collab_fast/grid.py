"""Comparison grids: patterns x label-noise levels x seeds (x any trainer flag), run, resumed, tabulated.

    python -m collab_fast.grid OUT --patterns single,ilr2,hier4 --noise 0,0.2,0.4 --seeds 0,1,2 \
        [--axis beta=0.3,0.5 ...] [--jobs N] -- digits --arch resnet32 --epochs 60 -b 64

Every cell is one trainer run in OUT/cells/<name>/ (its own process, `--resume auto`): a cell that finished
(OUT/cells/<name>/result.json) is never rerun, an interrupted one continues from its last checkpoint, so
running the same command again completes an interrupted grid. Cells run in parallel: one per GPU, or on
CPU `--jobs` cells with an equal share of the cores each (OMP threads).

Writes OUT/grid.json (one row per cell), OUT/grid.md (per setting: mean and standard deviation over seeds
of head 0's test error and the ensemble's, and the difference to the baseline pattern with a 95% confidence
interval over seeds, paired by seed), OUT/fig3.png (test error against label noise, one line per pattern,
as the paper's Fig. 3) and OUT/grid.html (both together). Cells trained with --holdout N evaluate on samples
held out of the training set, and every table and figure says "holdout error" instead of "test error":
choose settings on a holdout, report on the test split. The statistics and the files: grid_report.py.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import itertools
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from collab_fast.checkpoint import os_error_line, write_text_atomic
from collab_fast.cli import Parser
from collab_fast.extras import MissingExtra
from collab_fast.grid_report import markdown, rows_split, setting_of, write_outputs

__all__ = ["Cell", "eval_split", "main", "plan"]


class Cell(dict):
    """One run of the grid: {"pattern", "noise", "seed", plus one key per extra axis}."""

    @property
    def name(self) -> str:
        """A folder name inside OUT/cells/: axis values are reduced to [A-Za-z0-9._=+-] (no separators, no
        "..", no leading dot), with a hash of the raw name when anything was replaced, so that distinct cells
        never share a folder and none lands outside cells/."""
        extra = "".join(f"_{k}-{v}" for k, v in self.items() if k not in ("pattern", "noise", "seed"))
        raw = f"{self['pattern'].replace(':', '')}_noise{self['noise']:g}{extra}_seed{self['seed']}"
        safe = re.sub(r"[^A-Za-z0-9._=+-]", "-", raw).replace("..", "-").lstrip(".")
        if safe != raw:
            safe = f"{safe[:150]}-{hashlib.blake2b(raw.encode(), digest_size=4).hexdigest()}"
        return safe

    @property
    def setting(self) -> tuple:
        """Everything but the seed: the cells averaged together."""
        return setting_of(self)

    def flags(self) -> list[str]:
        out = ["--pattern", self["pattern"], "--label-noise", f"{self['noise']:g}", "--seed", str(self["seed"])]
        for k, v in self.items():
            if k not in ("pattern", "noise", "seed"):
                out += [f"--{k.replace('_', '-')}", str(v)]
        return out


def _numbers(text: str, what: str, kind: type = float) -> list:
    """A comma list of finite numbers (kind float) or integers (kind int), at least one."""
    try:
        out = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{what}: expected comma-separated {'integers' if kind is int else 'numbers'}, got "
                         f"{text!r}") from None
    if not out:
        raise ValueError(f"{what}: no values (got {text!r}); give at least one")
    if not all(math.isfinite(x) for x in out):
        raise ValueError(f"{what}: expected finite numbers, got {text!r}")
    return out


# Axes that are the grid's own dimensions under another name: refused (one dimension, one flag).
_OWN_AXES = {"pattern": "--patterns", "label_noise": "--noise", "noise": "--noise", "seed": "--seeds",
             "output": None, "resume": None}


def _axes(specs: list[str]) -> dict[str, list[str]]:
    axes: dict[str, list[str]] = {}
    for a in specs:
        if "=" not in a:
            raise ValueError(f"--axis {a!r}: expected FLAG=V1,V2")
        k, v = a.split("=", 1)
        key = k.strip().lstrip("-").replace("-", "_")
        if key in _OWN_AXES:
            own = _OWN_AXES[key]
            raise ValueError(f"--axis {k}: " + (f"that is the grid's own dimension; give its values with {own}" if own
                                                 else "set by the grid for each cell; it cannot be an axis"))
        if key in axes:
            raise ValueError(f"--axis {k} given twice; give its values once, comma-separated")
        values = [x for x in v.split(",") if x.strip()]
        if not values:
            raise ValueError(f"--axis {a!r}: no values; give at least one (FLAG=V1,V2)")
        axes[key] = values
    return axes


def _input_files(base: list[str]) -> dict[str, str]:
    """The files the trainer's flags name (--config, --weights, ...) and a hash of each one's content: part
    of a cell's identity, so that editing a config file reruns the cells instead of reusing their results.
    (Folders, such as --data, are not hashed.)"""
    out = {}
    for token in base:
        path = Path(token.split("=", 1)[1] if token.startswith("--") and "=" in token else token)
        try:
            if not path.is_file():
                continue
            h = hashlib.blake2b(digest_size=16)
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        except OSError as exc:
            raise ValueError(f"{token}: cannot read it ({os_error_line(exc)})") from None
        out[str(path.absolute())] = h.hexdigest()
    return out


def plan(patterns: list[str], noise: list[float], seeds: list[int], axes: dict[str, list[str]]) -> list[Cell]:
    """Every combination, the seed varying fastest (so a setting's seeds finish together)."""
    keys = list(axes)
    cells = []
    for pattern, level, *extra in itertools.product(patterns, noise, *axes.values()):
        for seed in seeds:
            cells.append(Cell(pattern=pattern, noise=level, **dict(zip(keys, extra)), seed=seed))
    return cells


def _last_eval(out: Path) -> dict | None:
    """The run's last evaluation, read as `report` reads runs (torn lines handled there)."""
    from collab_fast.report import load_run

    if not (out / "metrics.jsonl").is_file():
        return None
    evals = load_run(out)["eval"]
    return evals[-1] if evals else None


def run_cell(cell: Cell, root: Path, base: list[str], env: dict, lock: threading.Lock,
             inputs: dict[str, str] | None = None) -> dict:
    """Runs (or resumes, or skips) one cell; returns its result row. `inputs`: the files the flags name, with
    their content's hash (_input_files): a cell is this command on these contents."""
    if _cancel.is_set():
        raise Cancelled()
    inputs = inputs or {}
    out = root / "cells" / cell.name
    done = out / "result.json"
    cmd = [sys.executable, "-m", "collab_fast.train", *base, *cell.flags(), "--output", str(out / "run"),
           "--resume", "auto", "--progress", "off"]
    command = shlex.join(cmd[1:])
    identity = "\n".join([command, *(f"input {p} {h}" for p, h in sorted(inputs.items()))])
    row = _finished(done, cell, command, inputs)
    if row is not None:
        with lock:
            print(f"grid: {cell.name}: finished earlier, skipped", flush=True)
        return row
    out.mkdir(parents=True, exist_ok=True)
    # A run folder left by another command (other flags, more epochs) is moved aside, never continued.
    started = out / "command.txt"
    if (out / "run").exists() and (not started.is_file() or started.read_text().strip() != identity):
        old = started.read_bytes() if started.is_file() else b""
        aside = out / f"run.old-{hashlib.blake2b(old, digest_size=4).hexdigest()}"
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(out / "run", aside)
        with lock:
            print(f"grid: {cell.name}: the earlier run used another command; moved to {aside.name}", flush=True)
    done.unlink(missing_ok=True)
    started.write_text(identity + "\n")
    with lock:
        print(f"grid: {cell.name}: {command}", flush=True)
    with open(out / "train.log", "a") as log, lock:
        if _cancel.is_set():
            raise Cancelled()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent)
        _running.add(proc)
        if _cancel.is_set():  # a signal between the check above and the add: its handler did not see this cell
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait()
    finally:
        with lock:
            _running.discard(proc)
    if _cancel.is_set():
        raise Cancelled()
    ev = _last_eval(out / "run")
    if code != 0 or ev is None:
        tail = (out / "train.log").read_text(errors="replace").strip().splitlines()[-1:] or [""]
        raise RuntimeError(f"cell {cell.name} failed (exit {code}): {tail[0]} (log: {out / 'train.log'})")
    try:
        resolved = json.loads((out / "run" / "config.json").read_text())
    except (OSError, ValueError):
        resolved = {}
    row = {**cell, "cell": cell.name, "top1": ev["top1"], "top1_ensemble": ev["top1_ensemble"],
           "top1_heads": ev["top1_heads"], "val_loss_head0": ev["val_loss_head0"], "step": ev["step"],
           "eval_split": eval_split(resolved), "command": command, "inputs": inputs}
    write_text_atomic(done, json.dumps(row) + "\n")
    with lock:
        print(f"grid: {cell.name}: head 0 top-1 {ev['top1']:.2f}%", flush=True)
    return row


class Cancelled(Exception):
    """The grid was interrupted (SIGINT / SIGTERM): no new cell starts."""


_cancel = threading.Event()
_running: set = set()  # the cells' trainer processes


def _on_signal(signum, frame) -> None:
    # Pending cells are cancelled; running trainers get SIGTERM, write last.pt and stop (--resume continues them).
    _cancel.set()
    for proc in list(_running):
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)


def _finished(done: Path, cell: Cell, command: str, inputs: dict[str, str]) -> dict | None:
    """The cell's recorded result, if it is this cell's under this very command and these very input files;
    else None (rerun)."""
    try:
        row = json.loads(done.read_text())
    except (OSError, ValueError):
        return None  # absent or damaged: run it
    if not isinstance(row, dict) or row.get("cell") != cell.name or row.get("command") != command:
        return None
    if (row.get("inputs") or {}) != inputs:
        return None
    return row


def _die_with_parent() -> None:
    """In the cell's process (Linux): SIGTERM when the grid dies, even by SIGKILL, so the trainer writes
    last.pt and stops instead of running on unattended."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def eval_split(config: dict) -> str:
    """What a cell evaluated on, from the trainer's resolved config.json: "holdout" (--holdout N) or "test"."""
    return "holdout" if config.get("holdout") else "test"


def _check_flags(argv: list[str], cell: Cell) -> None:
    """The trainer's own validation of one cell's command line, as a ValueError (no usage dump)."""
    from collab_fast.config import parse_config

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parse_config(argv)
    except SystemExit:
        lines = err.getvalue().strip().splitlines() or ["invalid flags"]
        line = next((ln for ln in reversed(lines) if "error: " in ln), lines[-1])  # not the pointer to --help
        raise ValueError(f"cell {cell.name}: {line.split('error: ', 1)[-1]}") from None


def _jobs_and_envs(jobs: int | None, cells: int) -> list[dict]:
    """One environment per parallel slot: a GPU each, or an equal share of the CPU cores; never more slots
    than cells."""
    import torch

    base = dict(os.environ)
    if torch.cuda.is_available():
        gpus = torch.cuda.device_count()
        n = min(jobs or gpus, max(cells, 1))
        return [dict(base, CUDA_VISIBLE_DEVICES=str(i % gpus)) for i in range(n)]
    cores = os.cpu_count() or 1
    n = min(jobs or 1, max(cells, 1))
    threads = str(max(1, cores // n))
    return [dict(base, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads) for _ in range(n)]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    base = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    p = Parser(prog="python -m collab_fast.grid", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="grid folder (cells, table, figure)")
    p.add_argument("--patterns", default="single,ilr2,hier4", help="comma list (default: %(default)s)")
    p.add_argument("--noise", default="0", help="comma list of label-noise fractions (default: %(default)s)")
    p.add_argument("--seeds", default="0,1,2", help="comma list (default: %(default)s)")
    p.add_argument("--axis", action="append", default=[], metavar="FLAG=V1,V2",
                   help="another trainer flag as an axis, e.g. beta=0.3,0.5 (repeatable)")
    p.add_argument("--baseline", default=None, help="pattern the others are compared with (default: the first)")
    p.add_argument("--jobs", type=int, default=None,
                   help="cells at once (default: one per GPU; on CPU 1, with every core)")
    args = p.parse_args(own)
    if not base:
        p.error("give the trainer's flags after --, e.g. -- digits --arch resnet32 --epochs 60")
    try:
        patterns = [x for x in args.patterns.split(",") if x.strip()]
        if not patterns:
            raise ValueError(f"--patterns: no values (got {args.patterns!r}); give at least one")
        noise = _numbers(args.noise, "--noise")
        seeds = _numbers(args.seeds, "--seeds", int)
        axes = _axes(args.axis)
        for flag in ("--pattern", "--label-noise", "--seed", "--output", "--resume"):
            if any(a == flag or a.startswith(flag + "=") for a in base):
                raise ValueError(f"{flag} is set by the grid for each cell; remove it from the trainer's flags")
        if args.jobs is not None and args.jobs < 1:
            raise ValueError("--jobs must be >= 1")
        inputs = _input_files(base)
        for cell in {c.setting: c for c in plan(patterns, noise, seeds[:1], axes)}.values():
            _check_flags([*base, *cell.flags()], cell)  # every cell's flags are valid before anything runs
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    root = Path(args.out)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"error: cannot create the grid folder ({os_error_line(exc)})", file=sys.stderr)
        return 2
    command = "python -m collab_fast.grid " + " ".join(shlex.quote(a) for a in argv)
    cells = plan(patterns, noise, seeds, axes)
    envs = _jobs_and_envs(args.jobs, len(cells))
    lock, slots = threading.Lock(), list(range(len(envs)))

    def work(cell):
        with lock:
            slot = slots.pop()
        try:
            return run_cell(cell, root, base, envs[slot], lock, inputs)
        finally:
            with lock:
                slots.append(slot)

    print(f"grid: {len(cells)} cells, {len(envs)} at a time, in {root}", flush=True)
    _cancel.clear()
    handlers = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with ThreadPoolExecutor(len(envs)) as pool:
            rows = list(pool.map(work, cells))
        split = rows_split(rows)
        summary = write_outputs(root, rows, args.baseline or patterns[0], command, split)
    except Cancelled:
        done = len(list((root / "cells").glob("*/result.json")))
        print(f"grid: interrupted; {done} of {len(cells)} cells are finished, the running ones checkpointed "
              "(run the same command again to continue)", file=sys.stderr)
        return 130
    except (RuntimeError, MissingExtra) as exc:
        print(f"error: {exc} (run the same command again to continue the grid)", file=sys.stderr)
        return 1
    except OSError as exc:  # a full disk or a read-only folder under the grid
        print(f"error: {os_error_line(exc)} (run the same command again to continue the grid)", file=sys.stderr)
        return 1
    finally:
        for sig, h in handlers.items():
            signal.signal(sig, h)
    print(markdown(summary, args.baseline or patterns[0], command, split))
    print(f"grid: wrote {root / 'grid.md'}, {root / 'grid.json'}, {root / 'fig3.png'}, {root / 'grid.html'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
