"""Microbenchmark of branch's backward: autograd's default (accumulate, then multiply) vs the fused C++ op.

    python benchmarks/bench_rescale.py          # GPU: ResNet-50 layer2/layer3 outputs at batch 256
    python benchmarks/bench_rescale.py --quick  # one tiny shape (CPU smoke test)

What is timed: the backward of n children of one tensor, given the n incoming gradients (the forward is
an alias and costs nothing). The DRAM floor is n gradient reads plus one write, over the measured
device-to-device copy rate.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_output_args, bench, copy_bandwidth, format_row, output_dir, pct_of_floor, save  # noqa: E402

from collab_fast.extension import load_extension  # noqa: E402
from collab_fast.rescale import branch, branch_reference  # noqa: E402

GPU_SHAPES = [("layer2", (256, 512, 28, 28)), ("layer3", (256, 1024, 14, 14))]
CPU_SHAPES = [("layer3-b8", (8, 1024, 14, 14))]
PROVIDERS = {"autograd": branch_reference, "ours": branch}
COLUMNS = ["shape", "dtype", "n", "provider", "ms", "GB/s", "pct_floor", "speedup_vs_autograd"]


def run(name, shape, dtype, n, device, bandwidth):
    x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    grads = [torch.randn_like(x) for _ in range(n)]
    nbytes = (n + 1) * x.numel() * x.element_size()
    rows, base = [], None

    def step(fn):
        x.grad = None
        torch.autograd.backward(fn(x, n), grads)

    for fn in PROVIDERS.values():  # every provider warmed up (extension load, allocator) before any timing
        step(fn)
    for provider, fn in PROVIDERS.items():
        ms = bench(lambda fn=fn: step(fn), device)
        base = ms if provider == "autograd" else base
        rows.append({"shape": f"{name} {list(shape)}", "dtype": str(dtype).replace("torch.", ""), "n": n,
                     "provider": provider, "ms": ms, "GB/s": nbytes / (ms * 1e-3) / 1e9,
                     "pct_floor": pct_of_floor(nbytes, bandwidth, ms), "speedup_vs_autograd": base / ms})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one tiny shape (a smoke test)")
    add_output_args(p)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    load_extension()  # compile outside the timed region
    shapes = GPU_SHAPES if device.type == "cuda" else CPU_SHAPES
    if args.quick:
        shapes = [("tiny", (2, 16, 7, 7))]
    bandwidth = copy_bandwidth(device)
    print(f"device: {device}  copy bandwidth: {bandwidth / 1e9:.1f} GB/s")
    rows, out = [], output_dir(args, device)
    for name, shape in shapes:
        for dtype in (torch.bfloat16, torch.float32):
            for n in (2, 4):
                for r in run(name, shape, dtype, n, device, bandwidth):
                    rows.append(r)
                    print(format_row(r, COLUMNS), flush=True)
                save("bench_rescale", rows, device, argv, COLUMNS, out)  # after every row set
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
