"""Microbenchmark of the collaborative loss: eager reference vs torch.compile(reference) vs the fused kernel,
called eagerly ("ours"; "ours-prefetch" with the long-row loops pipelined) or inside a compiled function
("ours-compiled": Inductor's code launches the kernel, GPU only by default).

    python benchmarks/bench_loss.py            # GPU: the issue's shapes; CPU: tiny shapes (smoke test)
    python benchmarks/bench_loss.py --quick    # one tiny shape per provider (CI)

Modes: "forward" (loss only, logits without grad), "fwd+bwd" (loss and gradient), "backward" (derived:
fwd+bwd minus a forward that records the graph): whole Python calls; "fwd+bwd, 1 thread" is fwd+bwd with
autograd's multithreading off (backward on the calling thread, as a training loop without a device thread
hand-off runs it). On CUDA, the fused kernel also gets "forward kernel-only" and "fwd+bwd kernel-only"
rows: the same work captured in a CUDA graph and replayed, so host overhead (argument checks, launches: tens
of microseconds) does not hide a kernel that takes a few. Each time is the median over the repeats (CUDA
events via triton.testing.do_bench on GPU), with the 10th-90th percentile spread. "GiB" is the logits'
size. The DRAM floor is the bytes the op cannot avoid (logits read once, plus the gradient written once for
fwd+bwd) over the measured device-to-device copy rate; "% of floor" is given on kernel-only rows only, and
not where those bytes fit the GPU's L2 cache ("in L2": repeated calls read them from there, so no DRAM
floor bounds the time).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton.runtime.interpreter")
if not torch.cuda.is_available():  # the kernel runs in Triton's interpreter on CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")
import triton  # noqa: E402  (after TRITON_INTERPRET is set)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    add_output_args,
    bench,
    bench_spread,
    copy_bandwidth,
    cuda_graph,
    format_row,
    l2_bytes,
    output_dir,
    pct_of_floor,
    peak_extra_memory,
    save,
)

from collab_fast import collab_loss_reference, fused_collab_loss  # noqa: E402
from collab_fast.kernels import collab_loss as cl  # noqa: E402

# (name, H, N, C, dtype), most important first (a run cut off by a time limit keeps the shapes it finished).
# The LM vocabularies are real ones (Llama 3's 128256, Llama 2's 32000): not powers of two, so the kernel's
# last column block is partial as in use.
GPU_SHAPES = [
    ("imagenet", 4, 256, 1000, torch.float32),
    ("imagenet", 4, 256, 1000, torch.bfloat16),
    ("lm-128k", 2, 4096, 128256, torch.bfloat16),
    ("lm-32k", 8, 4096, 32000, torch.bfloat16),
    ("cifar10", 4, 128, 10, torch.float32),
    ("cifar100", 4, 128, 100, torch.float32),
]
CPU_SHAPES = [
    ("imagenet-tiny", 4, 16, 1000, torch.float32),
    ("cifar10-tiny", 4, 32, 10, torch.float32),
]
PROVIDERS = ("eager", "compiled", "ours", "ours-prefetch", "ours-compiled")
GPU_ONLY = ("ours-prefetch", "ours-compiled")  # meaningless in the CPU interpreter: by default on CUDA only
COLUMNS = ["shape", "H", "N", "C", "dtype", "GiB", "provider", "mode", "ms", "ms_p10", "ms_p90", "GB/s", "pct_floor",
           "in_L2", "speedup_vs_eager", "peak_extra_MB"]


def make_loss_fn(provider: str):
    kw = dict(temperature=2.0, beta=0.5)
    if provider == "eager":
        return lambda z, y: collab_loss_reference(z, y, **kw)
    if provider == "compiled":
        return torch.compile(lambda z, y: collab_loss_reference(z, y, **kw))
    if provider in ("ours", "ours-prefetch"):  # the second: see loop_stages
        return lambda z, y: fused_collab_loss(z, y, impl="triton", **kw)
    if provider == "ours-compiled":  # Inductor's code launches the kernel (the loss's Triton ops are traced)
        return torch.compile(lambda z, y: fused_collab_loss(z, y, impl="triton", **kw))
    raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")


@contextlib.contextmanager
def loop_stages(provider: str):
    """"ours-prefetch" runs (forward and backward alike) with the long-row loops software-pipelined two deep
    (cp.async of the next block; off by default, see collab_loss.launch.LOOP_STAGES): an A/B on the same shapes."""
    stages = cl.launch.LOOP_STAGES
    cl.launch.LOOP_STAGES = 2 if provider == "ours-prefetch" else stages
    try:
        yield
    finally:
        cl.launch.LOOP_STAGES = stages


def run_shape(name, H, N, C, dtype, providers, device, bandwidth):
    """Rows for one shape: every provider warmed up first, then each timed."""
    z0 = torch.randn(H, N, C, device=device, dtype=dtype)
    y = torch.randint(0, C, (N,), device=device)
    elt = z0.element_size()
    floors = {"forward": H * N * C * elt, "fwd+bwd": 2 * H * N * C * elt}
    l2 = l2_bytes(device)
    label = {"shape": name, "H": H, "N": N, "C": C, "dtype": str(dtype).replace("torch.", ""),
             "GiB": H * N * C * elt / 2**30}
    rows, eager_ms = [], {}
    fns = {provider: make_loss_fn(provider) for provider in providers}
    for provider, fn in fns.items():  # every provider warmed up (compilation, first launches) before any timing
        try:
            with loop_stages(provider):
                with torch.no_grad():
                    fn(z0, y)
                fn(z0.clone().requires_grad_(), y).backward()
        except torch.OutOfMemoryError:
            pass  # reported below, when this provider is timed
    for provider, fn in fns.items():
        z = z0.clone().requires_grad_()

        def fwd_nograd(fn=fn):
            with torch.no_grad():
                fn(z0, y)

        def fwd_graph(fn=fn, z=z):
            return fn(z, y)

        def fwd_bwd(fn=fn, z=z):
            z.grad = None
            fn(z, y).backward()

        try:
            with loop_stages(provider):
                times = {"forward": bench_spread(fwd_nograd, device), "fwd+bwd": bench_spread(fwd_bwd, device)}
                with torch.autograd.set_multithreading_enabled(False):
                    times["fwd+bwd, 1 thread"] = bench_spread(fwd_bwd, device)
                times["backward"] = {"ms": max(times["fwd+bwd"]["ms"] - bench(fwd_graph, device), 0.0)}
                peak = peak_extra_memory(fwd_bwd, device)
                if provider.startswith("ours") and device.type == "cuda":
                    for mode, step in (("forward", fwd_nograd), ("fwd+bwd", fwd_bwd)):
                        try:
                            times[f"{mode} kernel-only"] = bench_spread(cuda_graph(step), device)
                        except RuntimeError as exc:  # recorded, not fatal: the end-to-end rows stand
                            rows.append({**label, "provider": provider, "mode": f"{mode} kernel-only: capture "
                                         f"failed: {str(exc).splitlines()[0][:80]}"})
        except torch.OutOfMemoryError:
            # The eager reference materialises several fp32 [H, N, C] tensors: at LM shapes it may not fit.
            z.grad = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
            rows.append({**label, "provider": provider, "mode": "out of memory"})
            continue
        for mode, t in times.items():
            ms = t["ms"]
            if provider == "eager":
                eager_ms[mode] = ms
            nbytes = floors.get(mode.removesuffix(" kernel-only").removesuffix(", 1 thread"))
            gbs = nbytes / (ms * 1e-3) / 1e9 if nbytes and ms > 0 else None
            in_l2 = l2 is not None and nbytes is not None and nbytes <= l2
            rows.append({
                **label, "provider": provider, "mode": mode, "ms": ms, "ms_p10": t.get("ms_p10"),
                "ms_p90": t.get("ms_p90"), "GB/s": gbs,
                "pct_floor": pct_of_floor(nbytes, bandwidth, ms) if mode.endswith("kernel-only") and not in_l2 else None,
                "in_L2": in_l2 if l2 is not None and nbytes is not None else None,
                "speedup_vs_eager": eager_ms[mode] / ms if mode in eager_ms and ms > 0 else None,
                "peak_extra_MB": peak / 2**20 if peak is not None and mode == "fwd+bwd" else None,
            })
        del z
    return rows


# --sweep: the kernel's launch configuration at the LM shapes, kernel-only (CUDA graph replay), to choose
# pick_block_c's defaults from measurements. tile = H_PAD * BLOCK_C elements of the register tile.
SWEEP_TILES = (4096, 8192, 16384)
SWEEP_WARPS = (4, 8, 16)
SWEEP_STAGES = (1, 2)
SWEEP_COLUMNS = ["shape", "H", "N", "C", "dtype", "tile", "block_c", "warps", "stages", "mode", "ms", "GB/s",
                 "pct_floor", "default"]


@contextlib.contextmanager
def launch_config(tile: int, warps: int, stages: int):
    """The launcher's block, warps and prefetch depth forced to one configuration."""
    pick, depth = cl.launch.pick_block_c, cl.launch.LOOP_STAGES

    def forced(num_heads, num_classes, block_c=None):
        h_pad = triton.next_power_of_2(num_heads)
        block = min(triton.next_power_of_2(num_classes), max(tile // h_pad, 16))
        return block, triton.cdiv(num_classes, block), warps

    cl.launch.pick_block_c, cl.launch.LOOP_STAGES = forced, stages
    try:
        yield
    finally:
        cl.launch.pick_block_c, cl.launch.LOOP_STAGES = pick, depth


def sweep(shapes, device, bandwidth, out=None, argv=None):
    """fwd+bwd kernel-only time (forward keeping row statistics, then backward: a training step's launches)
    of every configuration; the rows are saved after each one (a run cut off keeps what it timed)."""
    rows = []
    for name, H, N, C, dtype in shapes:
        z = torch.randn(H, N, C, device=device, dtype=dtype, requires_grad=True)
        y = torch.randint(0, C, (N,), device=device)
        nbytes = 2 * H * N * C * z.element_size()
        d_block, _, d_warps = cl.launch.pick_block_c(H, C)
        d_tile = triton.next_power_of_2(H) * d_block

        def fwd_bwd(z=z, y=y):
            z.grad = None
            fused_collab_loss(z, y, impl="triton", temperature=2.0, beta=0.5).backward()

        for tile in SWEEP_TILES:
            for warps in SWEEP_WARPS:
                for stages in SWEEP_STAGES:
                    row = {"shape": name, "H": H, "N": N, "C": C, "dtype": str(dtype).replace("torch.", ""),
                           "tile": tile, "block_c": min(triton.next_power_of_2(C), tile // triton.next_power_of_2(H)),
                           "warps": warps, "stages": stages, "mode": "fwd+bwd kernel-only",
                           "default": tile == d_tile and warps == d_warps and stages == cl.launch.LOOP_STAGES}
                    try:
                        with launch_config(tile, warps, stages):
                            ms = bench(cuda_graph(fwd_bwd), device)
                        row.update({"ms": ms, "GB/s": nbytes / (ms * 1e-3) / 1e9,
                                    "pct_floor": pct_of_floor(nbytes, bandwidth, ms)})
                    except Exception as exc:  # a configuration that does not compile or fit: recorded
                        row["mode"] += f": {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
                    rows.append(row)
                    print(format_row(row, SWEEP_COLUMNS), flush=True)
                    if out is not None:
                        save("bench_loss_sweep", rows, device, argv, SWEEP_COLUMNS, out)
    return rows


def host_profile(device, calls: int = 200) -> None:
    """Where the whole call's time goes at the ImageNet shape: host microseconds per call (no sync), and
    cProfile's top functions over fwd+bwd calls (autograd's multithreading off, so backward runs here)."""
    import cProfile
    import io
    import pstats
    import time

    H, N, C = (4, 256, 1000) if device.type == "cuda" else (2, 8, 50)  # CPU: the interpreter, a smoke test
    z0 = torch.randn(H, N, C, device=device)
    y = torch.randint(0, C, (N,), device=device)
    z = z0.clone().requires_grad_()

    def per_call(fn):
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        host = (time.perf_counter() - t0) / calls * 1e6
        if device.type == "cuda":
            torch.cuda.synchronize()
        return host

    def fwd_nograd():
        with torch.no_grad():
            fused_collab_loss(z0, y, impl="triton")

    def fwd_graph():
        return fused_collab_loss(z, y, impl="triton")

    def fwd_bwd():
        z.grad = None
        fused_collab_loss(z, y, impl="triton").backward()

    with torch.autograd.set_multithreading_enabled(False):
        for name, fn in (("forward, no grad", fwd_nograd), ("forward, recording", fwd_graph), ("fwd+bwd", fwd_bwd),
                         ("_launch forward", lambda: cl.launch.launch(z0, y, cl.params.DEFAULT)),
                         ("_num_valid", lambda: cl.launch.num_valid(y, cl.params.DEFAULT))):
            print(f"host_profile: {name:22s} {per_call(fn):8.1f} us per call (host, no sync)", flush=True)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(calls):
            fwd_bwd()
        prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(25)
    print("\n".join(line for line in out.getvalue().splitlines() if line.strip())[:6000], flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--providers", default=None,
                   help="comma list of eager,compiled,ours,ours-prefetch,ours-compiled (default: all; on CPU not "
                        "the last two)")
    p.add_argument("--shapes", default=None, help="comma list of shape names (default: all for the device)")
    p.add_argument("--compiled-shapes", default=None,
                   help="comma list of shape names on which the 'compiled' and 'ours-compiled' providers run "
                        "(default: all); "
                        "Inductor compiles each shape and dtype anew, tens of seconds each on a GPU")
    p.add_argument("--quick", action="store_true", help="one tiny shape (a smoke test)")
    p.add_argument("--sweep", action="store_true",
                   help="time the kernel (kernel-only) over block, warps and prefetch depth instead of the providers")
    p.add_argument("--host-profile", action="store_true",
                   help="print where a whole call's host time goes at the ImageNet shape, then exit")
    add_output_args(p)
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = GPU_SHAPES if device.type == "cuda" else CPU_SHAPES
    if args.quick:
        shapes = [("tiny", 3, 8, 50, torch.float32)]
    if args.shapes:
        wanted = set(args.shapes.split(","))
        shapes = [s for s in shapes if s[0] in wanted]
        if not shapes:
            p.error(f"--shapes: none of {sorted(wanted)} is known here")
    default = PROVIDERS if device.type == "cuda" else tuple(x for x in PROVIDERS if x not in GPU_ONLY)
    providers = default if args.providers is None else tuple(args.providers.split(","))
    for pr in providers:
        if pr not in PROVIDERS:
            p.error(f"--providers: unknown provider {pr!r}; choose from {', '.join(PROVIDERS)}")

    if args.host_profile:
        host_profile(device, calls=200 if device.type == "cuda" else 2)
        return 0
    bandwidth = copy_bandwidth(device)
    print(f"device: {device}  copy bandwidth: {bandwidth / 1e9:.1f} GB/s")
    if args.sweep:
        if device.type != "cuda":
            p.error("--sweep times CUDA graph replays: it needs a GPU")
        sweep([s for s in shapes if s[0].startswith("lm") or args.shapes], device, bandwidth,
              output_dir(args, device), argv)
        return 0
    if device.type == "cpu":
        print("CPU run: the kernel runs in Triton's interpreter; these times are a smoke test, not a benchmark")
    rows, out = [], output_dir(args, device)
    compiled_on = None if args.compiled_shapes is None else set(args.compiled_shapes.split(","))
    for shape in shapes:
        here = tuple(pr for pr in providers
                     if "compiled" not in pr or compiled_on is None or shape[0] in compiled_on)
        for r in run_shape(*shape, here, device, bandwidth):
            rows.append(r)
            print(format_row(r, COLUMNS), flush=True)
        save("bench_loss", rows, device, argv, COLUMNS, out)  # after every shape: a cut-off run keeps its rows
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
