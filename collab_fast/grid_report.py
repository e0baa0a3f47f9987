"""A comparison grid's statistics and rendering: per setting (all but the seed) the mean and standard
deviation over seeds of head 0's and the ensemble's error, the seed-paired difference to the baseline
pattern with a 95% confidence interval, and grid.json, grid.md, fig3.png and grid.html from them. The grid's
cells are run by collab_fast.grid."""

from __future__ import annotations

import html
import json
import math
import statistics
from pathlib import Path

from collab_fast.checkpoint import write_text_atomic
from collab_fast.extras import require

__all__ = ["markdown", "rows_split", "setting_of", "summarize", "write_outputs"]

# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (then the normal's 1.96).
_T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def setting_of(cell: dict) -> tuple:
    """A cell's setting: everything but the seed (the cells averaged together)."""
    return tuple((k, v) for k, v in cell.items() if k != "seed")


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarize(rows: list[dict], baseline: str) -> list[dict]:
    """Per setting (all but the seed): test error of head 0 and of the ensemble over seeds, and the
    seed-paired difference to the baseline pattern's head 0 with a 95% confidence interval."""
    by_setting: dict[tuple, dict[int, dict]] = {}
    for r in rows:
        by_setting.setdefault(setting_of({k: r[k] for k in r if k in _cell_keys(r)}), {})[r["seed"]] = r
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


def rows_split(rows: list[dict]) -> str:
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


def markdown(summary: list[dict], baseline: str, command: str, split: str = "test") -> str:
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
    write_text_atomic(root / "grid.md", "# collab_fast grid\n\n" + markdown(summary, baseline, command, split))
    _plot(summary, root / "fig3.png", split)
    write_text_atomic(root / "grid.html", _html(summary, baseline, command, split))
    return summary
