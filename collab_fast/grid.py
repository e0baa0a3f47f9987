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
choose settings on a holdout, report on the test split.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import html
import io
import itertools
import json
import math
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from collab_fast.checkpoint import os_error_line, write_text_atomic
from collab_fast.cli import Parser
from collab_fast.extras import MissingExtra, require

__all__ = ["Cell", "main", "plan", "summarize"]

# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (then the normal's 1.96).
_T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


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
        return tuple((k, v) for k, v in self.items() if k != "seed")

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


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarize(rows: list[dict], baseline: str) -> list[dict]:
    """Per setting (all but the seed): test error of head 0 and of the ensemble over seeds, and the
    seed-paired difference to the baseline pattern's head 0 with a 95% confidence interval."""
    by_setting: dict[tuple, dict[int, dict]] = {}
    for r in rows:
        by_setting.setdefault(Cell({k: r[k] for k in r if k in _cell_keys(r)}).setting, {})[r["seed"]] = r
    out = []
    for setting, seeds in by_setting.items():
        s = dict(setting)
        err = [100 - r["top1"] for r in seeds.values()]
        ens = [100 - r["top1_ensemble"] for r in seeds.values()]
        m, sd = _mean_sd(err)
        me, sde = _mean_sd(ens)
        row = {**s, "seeds": len(err), "err_head0": m, "err_head0_sd": sd, "err_ensemble": me,
               "err_ensemble_sd": sde, "diff_vs_baseline": None, "diff_ci95": None}
        base = by_setting.get(tuple((k, baseline if k == "pattern" else v) for k, v in setting))
        if base is not None and s["pattern"] != baseline:
            diffs = [(100 - seeds[k]["top1"]) - (100 - base[k]["top1"]) for k in seeds if k in base]
            if diffs:
                dm, dsd = _mean_sd(diffs)
                n = len(diffs)
                half = (_T95[n - 2] if n - 2 < len(_T95) else 1.96) * dsd / math.sqrt(n) if n > 1 else None
                row["diff_vs_baseline"], row["diff_ci95"] = dm, half
        out.append(row)
    return out


def _cell_keys(row: dict) -> list[str]:
    skip = {"cell", "top1", "top1_ensemble", "top1_heads", "val_loss_head0", "step", "eval_split", "command",
            "inputs"}
    return [k for k in row if k not in skip]


def eval_split(config: dict) -> str:
    """What a cell evaluated on, from the trainer's resolved config.json: "holdout" (--holdout N) or "test"."""
    return "holdout" if config.get("holdout") else "test"


def _rows_split(rows: list[dict]) -> str:
    splits = {r.get("eval_split", "test") for r in rows}
    if len(splits) > 1:
        raise RuntimeError(f"the cells evaluated on different splits ({', '.join(sorted(splits))}): give every cell "
                           "the same --holdout")
    return splits.pop() if splits else "test"


_SUMMARY_KEYS = ("pattern", "noise", "seeds", "err_head0", "err_head0_sd", "err_ensemble", "err_ensemble_sd",
                 "diff_vs_baseline", "diff_ci95")


def _table(summary: list[dict], baseline: str, split: str) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the summary table, shared by grid.md and grid.html."""
    axes = [k for k in summary[0] if k not in _SUMMARY_KEYS]
    head = ["pattern", "label noise", *axes, "seeds", f"{split} error head 0 (%)", "ensemble (%)",
            f"head 0 vs {baseline} (points, 95% CI)"]
    rows = []
    for r in sorted(summary, key=lambda r: (r["noise"], str(r["pattern"]), *[str(r[a]) for a in axes])):
        diff = "-"
        if r["diff_vs_baseline"] is not None:
            ci = f" +- {r['diff_ci95']:.2f}" if r["diff_ci95"] is not None else ""
            diff = f"{r['diff_vs_baseline']:+.2f}{ci}"
        rows.append([str(r["pattern"]), f"{r['noise']:g}", *[str(r[a]) for a in axes], str(r["seeds"]),
                     f"{r['err_head0']:.2f} +- {r['err_head0_sd']:.2f}",
                     f"{r['err_ensemble']:.2f} +- {r['err_ensemble_sd']:.2f}", diff])
    return head, rows


def _split_line(split: str) -> str:
    where = ("samples held out of the training set (--holdout), not the test split" if split == "holdout"
             else "test split")
    return f"{split} error = 100 - top-1 on the {where}; mean +- standard deviation over seeds; the difference is " \
           "paired by seed"


def _markdown(summary: list[dict], baseline: str, command: str, split: str = "test") -> str:
    head, rows = _table(summary, baseline, split)
    lines = [f"- command: `{command}`", f"- {_split_line(split)}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _html(summary: list[dict], baseline: str, command: str, split: str = "test") -> str:
    head, rows = _table(summary, baseline, split)
    e = html.escape
    cells = lambda tag, row: "<tr>" + "".join(f"<{tag}>{e(c)}</{tag}>" for c in row) + "</tr>"  # noqa: E731
    return ("<!doctype html><html><head><meta charset='utf-8'><title>collab_fast grid</title><style>"
            "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #bbb;padding:.25em .6em;text-align:right}th{background:#eee}"
            "td:first-child{text-align:left}</style></head><body><h1>collab_fast grid</h1>"
            f"<p>command: <code>{e(command)}</code></p><p>{e(_split_line(split))}</p>"
            "<img src='fig3.png' alt='test error of head 0 against label noise'>"
            f"<table><thead>{cells('th', head)}</thead><tbody>"
            + "".join(cells("td", row) for row in rows) + "</tbody></table></body></html>\n")


def _plot(summary: list[dict], path: Path, split: str = "test") -> None:
    require("matplotlib", "train", "drawing the grid's figure").use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    lines: dict[tuple, list[dict]] = {}
    for r in summary:
        key = tuple((k, v) for k, v in r.items() if k not in ("noise", "seeds") and not k.startswith(("err", "diff")))
        lines.setdefault(key, []).append(r)
    groups = sorted(lines.items(), key=lambda kv: str(kv[0]))
    levels = sorted({r["noise"] for r in summary})
    if len(levels) == 1:
        # One noise level: a line through one point is a dot; bars with the seeds' spread read as a comparison.
        labels = [", ".join(str(v) for _, v in key) for key, _ in groups]
        ax.bar(range(len(groups)), [rs[0]["err_head0"] for _, rs in groups],
               yerr=[rs[0]["err_head0_sd"] for _, rs in groups], capsize=4, color="C0", alpha=0.8)
        ax.set_xticks(range(len(groups)), labels, rotation=20 if len(groups) > 4 else 0, ha="right" if
                      len(groups) > 4 else "center", fontsize=8)
        ax.set_title(f"{split} error at label noise {100 * levels[0]:g}% (mean +- sd over seeds)")
    else:
        for key, rs in groups:
            rs = sorted(rs, key=lambda r: r["noise"])
            ax.errorbar([100 * r["noise"] for r in rs], [r["err_head0"] for r in rs],
                        yerr=[r["err_head0_sd"] for r in rs], marker="o", ms=4, capsize=3,
                        label=", ".join(str(v) for _, v in key))
        ax.set_xlabel("label noise (%)")
        ax.set_title(f"{split} error vs label noise (mean +- sd over seeds)")
        ax.legend(fontsize=8)
    ax.set_ylabel(f"{split} error of head 0 (%)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(root: Path, rows: list[dict], baseline: str, command: str, split: str = "test") -> list[dict]:
    summary = summarize(rows, baseline)
    record = {"command": command, "eval_split": split, "cells": rows, "summary": summary}
    write_text_atomic(root / "grid.json", json.dumps(record, indent=1))
    write_text_atomic(root / "grid.md", "# collab_fast grid\n\n" + _markdown(summary, baseline, command, split))
    _plot(summary, root / "fig3.png", split)
    write_text_atomic(root / "grid.html", _html(summary, baseline, command, split))
    return summary


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
        split = _rows_split(rows)
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
    print(_markdown(summary, args.baseline or patterns[0], command, split))
    print(f"grid: wrote {root / 'grid.md'}, {root / 'grid.json'}, {root / 'fig3.png'}, {root / 'grid.html'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
