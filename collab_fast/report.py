"""Run reports: `python -m collab_fast.report OUTPUT [OUTPUT2 ...]` draws what happened.

Reads each run's metrics.jsonl and checkpoint and writes FIRST_OUTPUT/report.html (or --out DIR) with PNGs:
  curves.png     train loss, train accuracy per head, val top-1 per head and of the ensemble (runs overlaid)
  speed.png      images/s and peak memory over the steps
  weights.png    per-layer weight distribution of head 0's network for each run (the paper's Fig. 4)
  dead.png       per-layer fraction of near-zero ("dead") weights and weight standard deviation
                 (the paper's Supp. Table 1)
and a summary table: final top-1/top-5 of head 0, best head and ensemble; wall time; peak memory.
A run that was interrupted and resumed logs some steps twice: the resumed values win.
"""

from __future__ import annotations

import argparse
import html
import json
import sys
from pathlib import Path

import torch

from collab_fast.checkpoint import CheckpointError, load_checkpoint, load_file, os_error_line
from collab_fast.cli import Parser
from collab_fast.extras import MissingExtra, require

__all__ = ["layer_weight_stats", "load_run", "main", "write_report"]


def load_run(out: str | Path) -> dict:
    """Metrics of one run, de-duplicated: train records by step and eval records by epoch (last wins)."""
    out = Path(out)
    path = out / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{out} has no metrics.jsonl: not a collab_fast run directory")
    train, evals, times = {}, {}, []
    lines = path.read_text(errors="replace").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):
                continue  # a line cut by a crash mid-write
            raise ValueError(f"{path}:{n} is not JSON (a damaged or foreign metrics file)") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("time"), (int, float)):
            raise ValueError(f"{path}:{n} is not a collab_fast metrics record (a damaged or foreign metrics file)")
        times.append(rec["time"])
        kind = rec.get("kind")
        need = {"train": ("step", "loss", "train_acc", "img_per_s"), "eval": ("step", "epoch", "top1", "top1_heads")}
        missing = [k for k in need.get(kind, ()) if k not in rec]
        if missing:
            raise ValueError(f"{path}:{n}: a {kind} record without {', '.join(missing)} (a damaged or foreign "
                             "metrics file)")
        if kind == "train":
            train[rec["step"]] = rec
        elif kind == "eval":
            evals[(rec["epoch"], rec["step"])] = rec
    config = {}
    if (out / "config.json").is_file():
        try:
            config = json.loads((out / "config.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"{out / 'config.json'} is not JSON (a damaged run folder)") from None
        if not isinstance(config, dict):
            raise ValueError(f"{out / 'config.json'} is not a run configuration (a damaged run folder)")
    return {"dir": out, "name": out.name, "config": config, "train": [train[k] for k in sorted(train)],
            "eval": [evals[k] for k in sorted(evals, key=lambda k: k[1])], "times": times}


def head0_weights(out: Path) -> dict[str, torch.Tensor]:
    """Head 0's conv/linear weights: from head0.pth, else exported from last.pt (an unfinished run)."""
    if (out / "head0.pth").is_file():
        sd = load_file(out / "head0.pth")
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise CheckpointError(f"{out / 'head0.pth'} holds a {type(sd).__name__}, not a state dict of tensors")
    else:
        from collab_fast.export import model_from_config

        ckpt = load_checkpoint(out / "last.pt")
        model = model_from_config(ckpt["config"])
        model.load_state_dict(ckpt["model"])
        sd = model.export_head(0).state_dict()
    return {k: v.float() for k, v in sd.items() if k.endswith("weight") and v.dim() >= 2}


def layer_weight_stats(weights: dict[str, torch.Tensor], dead_threshold: float = 1e-3) -> list[dict]:
    """Per layer: name, count, std, fraction with |w| < dead_threshold, and quantiles for the plot."""
    rows = []
    q = torch.tensor([0.01, 0.25, 0.5, 0.75, 0.99])
    for name, w in weights.items():
        flat = w.flatten()
        sample = flat if flat.numel() <= 1_000_000 else flat[torch.randperm(flat.numel())[:1_000_000]]
        rows.append({"layer": name.removesuffix(".weight"), "count": flat.numel(), "std": float(flat.std()),
                     "dead": float((flat.abs() < dead_threshold).float().mean()),
                     "quantiles": torch.quantile(sample, q).tolist()})
    return rows


def _finish(plt, fig, axes, xlabel: str, path: Path, legend_size: int = 8) -> str:
    """Common axis styling, then save and close the figure; returns the file name."""
    for a in axes:
        a.set_xlabel(xlabel)
        a.grid(alpha=0.3)
        a.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _plots(runs: list[dict], stats: dict[str, list[dict]], out: Path, dead_threshold: float) -> list[str]:
    require("matplotlib", "train", "drawing the report").use("Agg")
    import matplotlib.pyplot as plt

    files = []
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.5))
    for r in runs:
        steps = [t["step"] for t in r["train"]]
        dots = {"marker": "o", "ms": 4} if len(steps) < 30 else {}  # short runs: every point visible
        ax[0].plot(steps, [t["loss"] for t in r["train"]], label=r["name"], **dots)
        heads = len(r["train"][0]["train_acc"]) if r["train"] else 0
        for h in range(heads):
            ax[1].plot(steps, [100 * t["train_acc"][h] for t in r["train"]], label=f"{r['name']} head {h}",
                       alpha=0.8, lw=1, **dots)
        ev = r["eval"]
        if ev:
            es = [e["step"] for e in ev]
            for h in range(len(ev[0]["top1_heads"])):
                ax[2].plot(es, [e["top1_heads"][h] for e in ev], marker="o", ms=3, lw=1, label=f"{r['name']} head {h}")
            ax[2].plot(es, [e["top1_ensemble"] for e in ev], marker="s", ls="--", lw=2, label=f"{r['name']} ensemble")
    for a, title, yl in zip(ax, ("train loss", "train accuracy per head", "val top-1 (heads, ensemble)"),
                            ("loss", "%", "%")):
        a.set_title(title)
        a.set_ylabel(yl)
    files.append(_finish(plt, fig, ax, "step", out / "curves.png", legend_size=7))

    fig, ax = plt.subplots(1, 2, figsize=(12, 4))
    for r in runs:
        steps = [t["step"] for t in r["train"]]
        dots = {"marker": "o", "ms": 4} if len(steps) < 30 else {}
        ax[0].plot(steps, [t["img_per_s"] for t in r["train"]], label=r["name"], **dots)
        mem = [t.get("peak_mem_mb", t.get("peak_rss_mb")) for t in r["train"]]
        ax[1].plot(steps, mem, label=r["name"], **dots)
    ax[0].set_title("images / s")
    ax[1].set_title("peak memory (MB; GPU allocated, or process RSS on CPU)")
    files.append(_finish(plt, fig, ax, "step", out / "speed.png"))

    n = len(stats)
    fig, axes = plt.subplots(n, 1, figsize=(max(8, 0.18 * max(len(s) for s in stats.values())), 3 * n), squeeze=False)
    for a, (name, rows) in zip(axes[:, 0], stats.items()):
        x = range(len(rows))
        qs = list(zip(*[r["quantiles"] for r in rows]))
        a.fill_between(x, qs[0], qs[4], alpha=0.2, label="1-99%")
        a.fill_between(x, qs[1], qs[3], alpha=0.5, label="25-75%")
        a.plot(x, qs[2], lw=1, label="median")
        a.set_title(f"{name}: per-layer weight distribution of head 0 (layers in forward order)")
    files.append(_finish(plt, fig, axes[:, 0], "layer", out / "weights.png", legend_size=7))

    fig, ax = plt.subplots(1, 2, figsize=(14, 4))
    for name, rows in stats.items():
        ax[0].plot([100 * r["dead"] for r in rows], marker=".", label=name)
        ax[1].plot([r["std"] for r in rows], marker=".", label=name)
    ax[0].set_title(f"near-zero weights per layer (|w| < {dead_threshold:g}), %")
    ax[1].set_title("weight standard deviation per layer")
    files.append(_finish(plt, fig, ax, "layer", out / "dead.png"))
    return files


def _summary(r: dict) -> dict:
    ev = r["eval"][-1] if r["eval"] else {}
    heads = ev.get("top1_heads", [])
    best = max(range(len(heads)), key=lambda h: heads[h]) if heads else None
    times = r["times"]  # every record's, the run's start record included
    mem = [t.get("peak_mem_mb", t.get("peak_rss_mb")) for t in r["train"]]
    return {"run": r["name"], "arch": r["config"].get("arch"), "pattern": r["config"].get("pattern"),
            "steps": r["train"][-1]["step"] if r["train"] else 0,
            "top1_head0": ev.get("top1"), "top5_head0": ev.get("top5"),
            "best_head": f"{best} ({heads[best]:.2f})" if best is not None else None,
            "top1_ensemble": ev.get("top1_ensemble"), "top5_ensemble": ev.get("top5_ensemble"),
            "wall_min": (max(times) - min(times)) / 60 if len(times) > 1 else None,
            "peak_mem_mb": max(m for m in mem if m is not None) if any(m is not None for m in mem) else None}


def write_report(dirs: list[str | Path], out: str | Path | None = None, dead_threshold: float = 1e-3) -> Path:
    runs = [load_run(d) for d in dirs]
    out = Path(out) if out else Path(dirs[0])
    out.mkdir(parents=True, exist_ok=True)
    stats, why = {}, []
    for r in runs:
        try:
            stats[r["name"]] = layer_weight_stats(head0_weights(r["dir"]), dead_threshold)
        except (CheckpointError, FileNotFoundError) as exc:
            print(f"note: no weights for {r['name']} ({exc})", file=sys.stderr)
            why.append(str(exc))
    if not stats:
        raise FileNotFoundError(f"no run has readable weights: {'; '.join(why)}")
    images = _plots(runs, stats, out, dead_threshold)
    rows = [_summary(r) for r in runs]
    cols = list(rows[0])
    fmt = lambda v: "-" if v is None else (f"{v:.2f}" if isinstance(v, float) else html.escape(str(v)))
    table = "<table><tr>" + "".join(f"<th>{c}</th>" for c in cols) + "</tr>" + "".join(
        "<tr>" + "".join(f"<td>{fmt(r[c])}</td>" for c in cols) + "</tr>" for r in rows) + "</table>"
    layer_tables = "".join(
        f"<h3>{html.escape(name)}: per-layer weight std and near-zero fraction (|w| &lt; {dead_threshold:g})</h3>"
        "<table><tr><th>layer</th><th>weights</th><th>std</th><th>near-zero %</th></tr>" + "".join(
            f"<tr><td>{html.escape(s['layer'])}</td><td>{s['count']}</td><td>{s['std']:.4g}</td>"
            f"<td>{100 * s['dead']:.2f}</td></tr>" for s in srows) + "</table>" for name, srows in stats.items())
    body = (f"<h1>collab_fast report: {', '.join(html.escape(r['name']) for r in runs)}</h1>"
            f"<h2>Summary</h2>{table}"
            + "".join(f"<h2>{html.escape(img.removesuffix('.png'))}</h2><img src='{img}' alt='{img}'>" for img in images)
            + f"<h2>Per-layer statistics</h2>{layer_tables}")
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}img{max-width:100%}")
    path = out / "report.html"
    path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>collab_fast report</title>"
                    f"<style>{style}</style></head><body>{body}</body></html>\n")
    return path


def main(argv=None) -> int:
    p = Parser(prog="python -m collab_fast.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run output directories (overlaid in the plots)")
    p.add_argument("--out", default=None, help="where to write report.html and the PNGs (default: the first run)")
    p.add_argument("--dead-threshold", type=float, default=1e-3, help="|w| below this counts as near zero")
    args = p.parse_args(argv)
    try:
        path = write_report(args.runs, args.out, args.dead_threshold)
    except (FileNotFoundError, ValueError, CheckpointError, MissingExtra) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # --out read-only or full
        print(f"error: cannot write the report ({os_error_line(exc)}); choose another --out", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
