"""Shared benchmark plumbing: timing (CUDA events on GPU), hardware floors, result files.

On a GPU every time is the median of triton.testing.do_bench (warm-up, CUDA events, L2 flushed). On
CPU the same functions time with perf_counter and every row is tagged device=cpu: such rows are
smoke tests of the scripts, never GPU results.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def versions() -> dict:
    try:
        import triton

        tv = triton.__version__
    except Exception:  # pragma: no cover
        tv = None
    return {"torch": torch.__version__, "triton": tv, "cuda": torch.version.cuda, "python": sys.version.split()[0]}


def bench(fn, device: torch.device, warmup_ms: float = 25, rep_ms: float = 100, cpu_reps: int = 11) -> float:
    """Median milliseconds of fn()."""
    return bench_spread(fn, device, warmup_ms, rep_ms, cpu_reps)["ms"]


def bench_spread(fn, device: torch.device, warmup_ms: float = 25, rep_ms: float = 100, cpu_reps: int = 11) -> dict:
    """Milliseconds of fn() over its repeats: median ("ms"), 10th and 90th percentiles, and the count."""
    if device.type == "cuda":
        import triton.testing

        times = [float(t) for t in triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="all")]
    else:
        fn()  # warm-up (compilation, allocator)
        times = []
        for _ in range(cpu_reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    at = lambda q: times[min(len(times) - 1, round(q * (len(times) - 1)))]  # noqa: E731
    return {"ms": statistics.median(times), "ms_p10": at(0.1), "ms_p90": at(0.9), "reps": len(times)}


def l2_bytes(device: torch.device) -> int | None:
    """The GPU's L2 cache in bytes (None off CUDA): data that fit there are not read from DRAM again."""
    if device.type != "cuda":
        return None
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)) or None


def cuda_graph(fn):
    """fn captured once into a CUDA graph (after warm-up launches on a side stream, as capture requires);
    returns the graph's replay: the kernels alone, with no Python, argument checks or launch overhead."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy rate in bytes/s (read + write counted)."""
    if device.type != "cuda":
        nbytes = 64 << 20
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), device)
    return 2 * nbytes / (ms * 1e-3)


def peak_extra_memory(fn, device: torch.device) -> int | None:
    """Peak bytes allocated by fn() above what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def add_output_args(p) -> None:
    """--out / --no-save, the same for every benchmark script."""
    p.add_argument("--out", default=None, metavar="DIR",
                   help=f"where to write the JSON and markdown results (default: {RESULTS_DIR} on a GPU; CPU smoke "
                        "runs are printed only unless --out is given)")
    p.add_argument("--no-save", action="store_true", help="print only")


def output_dir(args, device: torch.device) -> Path | None:
    """The results folder for this run, or None (print only)."""
    if args.no_save:
        return None
    if args.out:
        return Path(args.out)
    if device.type == "cuda":
        return RESULTS_DIR
    print("CPU smoke run: results not saved (pass --out DIR to keep them)")
    return None


def pct_of_floor(nbytes: float | None, bandwidth: float, ms: float) -> float | None:
    """Percent of the DRAM floor reached, or None where the time beats the floor: the data were served
    from a cache, so the DRAM floor does not bound the operation (never a figure above 100%)."""
    if not nbytes or ms <= 0:
        return None
    pct = 100 * nbytes / bandwidth / (ms * 1e-3)
    return pct if pct <= 100 else None


def write_results(name: str, rows: list[dict], device: torch.device, command: str, columns: list[str],
                  out_dir: Path = RESULTS_DIR) -> Path:
    """Writes out_dir/<name>_<device>_<date>.{json,md}; returns the JSON path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    today = _dt.date.today().isoformat()
    tag = "cpu" if device.type == "cpu" else torch.cuda.get_device_name(device).replace(" ", "-").lower()
    meta = {"device": device_name(device), "versions": versions(), "date": today, "command": command}
    stem = out_dir / f"{name}_{tag}_{today}"
    json_path = stem.with_suffix(".json")
    json_path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = [
        f"# {name}",
        "",
        f"- device: {meta['device']}",
        f"- versions: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}",
        f"- date: {today}",
        f"- command: `{command}`",
    ]
    if device.type == "cpu":
        lines.append("- CPU run: a smoke test of the script (Triton runs in its interpreter), not a performance figure")
    lines += ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return json_path


def write_tables(text: str, payload, json_path: str | None, out: str, stem: str) -> None:
    """A no-GPU script's markdown and JSON: to `json_path` if given, else both under `out` as `stem`.md/.json."""
    print(text)
    if json_path:
        Path(json_path).write_text(json.dumps(payload, indent=1))
        return
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.md").write_text(text)
    (folder / f"{stem}.json").write_text(json.dumps(payload, indent=1))
    print(f"written: {folder / stem}.md, .json")


def format_row(row: dict, columns: list[str] | None = None) -> str:
    """One console line: key=value for the given columns (all by default), None values left out."""
    keys = columns or list(row)
    return "  ".join(f"{k}={row[k]:.4g}" if isinstance(row[k], float) else f"{k}={row[k]}"
                     for k in keys if row.get(k) is not None)


def save(name: str, rows: list[dict], device: torch.device, argv: list[str] | None, columns: list[str],
         out_dir: Path | None = RESULTS_DIR) -> Path | None:
    """write_results with the exact command line that produced the rows (nothing when out_dir is None)."""
    if out_dir is None:
        return None
    args = sys.argv[1:] if argv is None else argv
    cmd = f"python benchmarks/{name}.py " + " ".join(shlex.quote(a) for a in args)
    path = write_results(name, rows, device, cmd.strip(), columns, Path(out_dir))
    print(f"wrote {path} and {path.with_suffix('.md')}")
    return path


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
