"""Memory and time of the collaborative loss at language-model vocabularies, forward + backward through the
output layers: fused_linear_collab_loss (chunked: the logits never exist) against materialised logits +
fused_collab_loss, and a naive PyTorch loss written head by head.

    python benchmarks/bench_fused_linear.py            # GPU: the issue's shapes; CPU: N scaled down (said so)
    python benchmarks/bench_fused_linear.py --quick    # tiny shapes (CI)

Peak extra memory is measured, not estimated: on CUDA by the caching allocator's peak above what was
allocated before the call; on CPU by the profiler's allocation events (replayed in order: every aten op's
own allocations and the frees between ops). "x logits" divides it by the bytes of the [H, N, C] logits.
"beyond_grads_mb" subtracts the gradients every provider must return (hidden's and the weight's): what
the loss itself costs. Times are medians (CUDA events on GPU); on CPU one timed run after a warm-up and the profiled run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_output_args, bench, format_row, output_dir, peak_extra_memory, save  # noqa: E402

from collab_fast import fused_collab_loss  # noqa: E402
from collab_fast.kernels.fused_linear import fused_linear_collab_loss  # noqa: E402

COLUMNS = ["provider", "shape", "dtype", "chunk_rows", "peak_extra_mb", "x_logits", "beyond_grads_mb", "ms"]


def naive_loss(z: torch.Tensor, y: torch.Tensor, T: float = 2.0) -> torch.Tensor:
    """What a user writes by hand: per head, CE to the label plus T^2 CE to the detached mean of the others."""
    total = 0.0
    for h in range(z.shape[0]):
        others = (z.sum(0) - z[h]).detach() / (z.shape[0] - 1)
        soft = -(F.softmax(others / T, -1) * F.log_softmax(z[h] / T, -1)).sum(-1).mean()
        total = total + 0.5 * F.cross_entropy(z[h], y) + 0.5 * T * T * soft
    return total


def providers(impl: str):
    def fused(x, w, y):
        return fused_linear_collab_loss(x, w, y, impl=impl)

    def materialised(x, w, y):
        return fused_collab_loss(torch.matmul(x, w.transpose(1, 2)), y, impl=impl)

    def naive(x, w, y):
        return naive_loss(torch.matmul(x, w.transpose(1, 2)), y)

    return {"fused linear (chunked)": fused, "logits + fused_collab_loss": materialised, "naive PyTorch": naive}


def cpu_peak_extra_memory(fn) -> int:
    """Peak bytes of fn()'s allocations above the start, from the profiler's memory events in time order."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    current = peak = 0
    for e in events:
        current += e.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


def run(shapes, device, dtype, reps_cpu=1):
    rows = []
    impl = "auto" if device.type == "cuda" else "torch"
    for H, N, D, C in shapes:
        g = torch.Generator(device="cpu").manual_seed(0)
        x = (torch.randn(H, N, D, generator=g) / D**0.5).to(device, dtype).requires_grad_()
        w = (torch.randn(H, C, D, generator=g) / D**0.5).to(device, dtype).requires_grad_()
        y = torch.randint(0, C, (N,), generator=g).to(device)
        logits_bytes = H * N * C * x.element_size()
        for name, fn in providers(impl).items():
            def step(fn=fn, x=x, w=w, y=y):
                x.grad = w.grad = None
                fn(x, w, y).backward()

            step()  # warm-up: every provider, compilation and allocator included
            x.grad = w.grad = None
            if device.type == "cuda":
                peak = peak_extra_memory(step, device)
                ms = bench(step, device)
            else:
                peak = cpu_peak_extra_memory(step)
                times = []
                for _ in range(reps_cpu):
                    t0 = time.perf_counter()
                    step()
                    times.append((time.perf_counter() - t0) * 1e3)
                ms = sorted(times)[len(times) // 2]
            chunk = None
            if name.startswith("fused"):
                from collab_fast.kernels.fused_linear import _pick_chunk

                esize = x.element_size() * (1 if impl != "torch" else 11)
                chunk = _pick_chunk(H, N, C, esize, None, None, grad_bytes=w.numel() * 4)
            row = {"provider": name, "shape": f"H{H} N{N} D{D} C{C}", "dtype": str(dtype).replace("torch.", ""),
                   "chunk_rows": chunk, "peak_extra_mb": round(peak / 2**20, 1), "x_logits": round(peak / logits_bytes, 2),
                   "beyond_grads_mb": round((peak - (x.numel() + w.numel()) * x.element_size()) / 2**20, 1),
                   "ms": round(ms, 1)}
            print(format_row(row, COLUMNS), flush=True)
            rows.append(row)
            x.grad = w.grad = None
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes (a smoke test)")
    add_output_args(p)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.quick:
        shapes, dtype = [(2, 64, 32, 1000)], torch.float32
    elif device.type == "cuda":
        shapes, dtype = [(2, 4096, 2048, 128256), (4, 2048, 1024, 32000)], torch.bfloat16
    else:
        # the shapes with N (and D of the first) scaled down for 2 cores (fp32: CPU matmuls), and N
        # doubled once to show what grows with N
        shapes, dtype = [(2, 256, 512, 128256), (2, 512, 512, 128256), (4, 256, 1024, 32000)], torch.float32
        print("CPU: N scaled down from the issue's 4096 / 2048 and D from 2048 to 512 for the 128256-class shape "
              "(the time of a CPU matmul); fp32", flush=True)
    rows = run(shapes, device, dtype)
    save("bench_fused_linear", rows, device, argv, COLUMNS, output_dir(args, device))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
