"""Training throughput, memory and model-FLOPs utilisation of the trainer's own step, per pattern, with the
paper's Table 4 cost columns beside ours.

    python benchmarks/bench_train.py                        # GPU: resnet50 x patterns, 224 px, batch 256, bf16
    python benchmarks/bench_train.py --modes all            # eager, compiled (model, whole step), captured, both
    python benchmarks/bench_train.py --batch-size 32,64,128,256 --modes eager,graph   # the batch axis
    python benchmarks/bench_train.py --quick                # CPU smoke test: resnet18, 32 px, batch 8

Modes: eager; compile (torch.compile of the model: --compile); step (the whole step compiled: --compile-step);
graph (the eager step captured in a CUDA graph: --cuda-graphs; on CPU the op-tape rehearsal, not a timing);
compile+graph (the compiled model inside the captured step: --compile --cuda-graphs; CUDA only).

Each row: median step time over --steps timed steps after --warmup steps (CUDA events per step on GPU) and
its spread (min-max), images/s = batch / median, the host's time per step call (median; a captured step's
is one replay's launch), peak memory (torch.cuda.max_memory_allocated over the timed steps), and MFU =
counted training FLOPs per image (3x forward, collab_fast.models.cost) x images/s, against two named peaks:
the measured bf16 matmul rate (mfu_pct) and the GPU's dense bf16 spec (mfu_spec_pct, where the GPU is known).
Pattern "plain" is the baseline: the same ResNet as single, trained by a plain PyTorch step (F.cross_entropy,
backward, torch.optim.SGD, fused as the trainer's), same batch, precision and mode (compiled or captured the
same way), so the ratio is honest. A pattern that runs out of memory is recorded as such and the run goes
on; the results are written after every row. Data: synthetic tensors already on the device (the data
pipeline is measured separately by bench_data.py), or --data toy for DALI-decoded JPEGs where DALI runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_output_args, bench, format_row, output_dir, save  # noqa: E402

from collab_fast.config import TrainConfig  # noqa: E402
from collab_fast.data import build_loaders  # noqa: E402
from collab_fast.graphs import CapturedStep  # noqa: E402
from collab_fast.models import build_model  # noqa: E402
from collab_fast.models.cost import pattern_cost  # noqa: E402
from collab_fast.optim import make_optimizer  # noqa: E402
from collab_fast.step import Step  # noqa: E402

# Paper Table 4 (ResNet-50, ImageNet): training time and memory relative to one model.
PAPER_TABLE4 = {"single": (1.0, 1.0), "inst2": (2.0, 2.0), "ilr2": (1.4, 1.32), "hier4": (1.75, 1.5)}
COLUMNS = ["arch", "pattern", "mode", "batch", "image", "img_per_s", "step_ms", "step_ms_min", "step_ms_max",
           "host_ms", "peak_mem_mb", "mfu_pct", "mfu_spec_pct", "time_vs_single", "mem_vs_single", "paper_time",
           "paper_mem", "note"]
MODES = ("eager", "compile", "step", "graph", "compile+graph")

# Dense bf16 tensor-core peaks from NVIDIA's data sheets (FLOP/s, without sparsity), by device-name substring.
SPEC_BF16 = {"H200": 989.4e12, "H100 SXM": 989.4e12, "H100 80GB HBM3": 989.4e12, "H100 PCIe": 756.5e12,
             "H100 NVL": 835.5e12, "A100": 312e12}


def spec_peak_flops(device: torch.device) -> tuple[float | None, str]:
    """The data-sheet dense bf16 peak of this GPU and its name (None where the name is not in SPEC_BF16)."""
    if device.type != "cuda":
        return None, "cpu"
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in SPEC_BF16.items() if k in name), None), name


def bf16_peak_flops(device: torch.device) -> float | None:
    """Measured dense bf16 matmul rate (FLOP/s): the denominator of MFU."""
    if device.type != "cuda":
        return None
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = bench(lambda: a @ b, device)
    return 2 * n**3 / (ms * 1e-3)


def time_steps(step, steps: int, warmup: int, device: torch.device) -> tuple[list[float], list[float]]:
    """(device ms per step: CUDA events on GPU, wall time on CPU; host ms per step call)."""
    for _ in range(warmup):
        step()
    times, host = [], []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
        for start, end in events:
            start.record()
            t0 = time.perf_counter()
            step()
            host.append((time.perf_counter() - t0) * 1e3)
            end.record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in events]
    else:
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
        host = times
    return times, host


class PlainStep:
    """The baseline: what a plain PyTorch training loop does for one network (no collab_fast code); under
    mode "step" compiled as the trainer's --compile-step compiles its own (forward and backward with
    compiled autograd, then the update), under "graph" captured as --cuda-graphs captures its own (the same
    CapturedStep around it), the learning rate a device tensor in both, so the ratio compares like with like."""

    def __init__(self, cfg, model, net, mode="eager"):
        device = next(net.parameters()).device
        self.lr = torch.tensor(0.1, device=device) if mode in ("step", "graph", "compile+graph") else None
        self.optimizer = torch.optim.SGD(net.parameters(), lr=0.1 if self.lr is None else self.lr, momentum=0.9,
                                         weight_decay=1e-4, fused=True)
        self.ddp, self.model = None, model
        self.amp = torch.bfloat16 if cfg.optim.amp == "bf16" else None
        self.micro, self.update = self._micro, self.optimizer.step
        if mode == "step":
            with torch._dynamo.config.patch(compiled_autograd=True):
                self.micro = torch.compile(self._micro)
            self.update = torch.compile(self.optimizer.step)

    def _micro(self, x, y):
        with torch.autocast(x.device.type, dtype=self.amp, enabled=self.amp is not None,
                            cache_enabled=self.lr is None):
            loss = F.cross_entropy(self.model(x), y)
        loss.backward()
        return loss.detach()

    def __call__(self, x, y, meter=None):
        loss = self.micro(x, y)
        self.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss


def run_one(arch, pattern, mode, batch, args, device, peak):
    """One row at one batch size; mode: eager, compile (the model: --compile), step (--compile-step), graph
    (--cuda-graphs) or compile+graph (--compile --cuda-graphs)."""
    cuda = device.type == "cuda"
    compiled, captured = mode in ("compile", "compile+graph"), mode in ("graph", "compile+graph")
    if compiled and captured and not cuda:  # (the op-tape rehearsal records ATen ops; compiled code runs outside)
        return {"arch": arch, "pattern": pattern, "mode": mode, "batch": batch, "image": args.image_size,
                "note": "needs CUDA"}
    cfg = TrainConfig.from_flags(args.data, arch=arch, pattern="single" if pattern == "plain" else pattern,
                                 batch_size=batch, lr=0.1, amp="bf16" if cuda else "off", channels_last=cuda,
                                 compile=compiled, compile_step=mode == "step", cuda_graphs=captured,
                                 image_size=args.image_size, synthetic_steps=10**9)
    train, _, classes = build_loaders(cfg.data, batch_size=batch, device=device, channels_last=cuda,
                                      synthetic_classes=1000)
    model = build_model(cfg.model, classes, device)
    optimizer = make_optimizer(model, cfg.optim)
    runner = torch.compile(model) if compiled else model
    train_step = Step(cfg, runner, model, optimizer) if pattern != "plain" else PlainStep(cfg, runner, model, mode)
    warmup = args.warmup
    if captured:
        train_step = CapturedStep(train_step)
        warmup = max(warmup, train_step.warmup + 1)  # the timed steps are replays
    batches = iter(train)
    x, y = next(batches)

    def step():
        nonlocal x, y
        if args.data != "synthetic":
            x, y = next(batches)
        train_step(x, y)

    model.train()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times, host = time_steps(step, args.steps, warmup, device)
    step_ms = statistics.median(times)
    img_s = batch / (step_ms * 1e-3)
    cost = pattern_cost(arch, cfg.model.pattern, args.image_size, classes)
    mem = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None
    spec, _ = spec_peak_flops(device)
    return {"arch": arch, "pattern": pattern, "mode": mode, "batch": batch, "image": args.image_size,
            "img_per_s": img_s, "step_ms": step_ms, "step_ms_min": min(times), "step_ms_max": max(times),
            "host_ms": statistics.median(host), "peak_mem_mb": mem,
            "mfu_pct": 100 * cost.train_flops * img_s / peak if peak else None,
            "mfu_spec_pct": 100 * cost.train_flops * img_s / spec if spec else None,
            "paper_time": PAPER_TABLE4.get(pattern, (None, None))[0] if arch == "resnet50" else None,
            "paper_mem": PAPER_TABLE4.get(pattern, (None, None))[1] if arch == "resnet50" else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--patterns", default="plain,single,ilr2,hier4,inst2,inst4",
                   help="comma list; plain = the same network by a plain eager PyTorch step (the baseline)")
    p.add_argument("--batch-size", default=None, metavar="B1,B2,...",
                   help="batch sizes, comma list (e.g. 32,64,128,256); default: 256 on a GPU, 16 on CPU")
    p.add_argument("--image-size", type=int, default=None, help="default: 224 on a GPU, 64 on CPU")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--modes", default="eager", metavar="M1,M2,...",
                   help=f"comma list of {', '.join(MODES)}, or all: eager; compile: torch.compile of the model "
                        "(--compile); step: the whole step compiled (--compile-step); graph: the step captured in a "
                        "CUDA graph (--cuda-graphs); compile+graph: both --compile and --cuda-graphs (CUDA only)")
    p.add_argument("--data", choices=["synthetic", "toy"], default="synthetic")
    p.add_argument("--quick", action="store_true", help="tiny CPU-sized run (a smoke test)")
    add_output_args(p)
    args = p.parse_args(argv)
    modes = list(MODES) if args.modes == "all" else [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - set(MODES):
        p.error(f"--modes: expected a comma list of {', '.join(MODES)} or all, got {args.modes!r}")
    try:
        batches = [int(b) for b in args.batch_size.split(",")] if args.batch_size else []
    except ValueError:
        p.error(f"--batch-size: expected comma-separated integers, got {args.batch_size!r}")
    if any(b < 1 for b in batches):
        p.error(f"--batch-size: every batch size must be at least 1, got {args.batch_size!r}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.quick:
        args.arch, batches, args.image_size, args.steps, args.warmup = "resnet18", [8], 32, 3, 1
        args.patterns = "plain,single,hier4"
    gpu = device.type == "cuda"
    if not batches or args.image_size is None:
        batches = batches or [256 if gpu else 16]
        args.image_size = args.image_size or (224 if gpu else 64)
        if not gpu:  # GPU-scale defaults would run for many minutes on CPU without a word
            print(f"bench_train: no GPU: CPU-sized defaults, batch {batches[0]} at {args.image_size} px "
                  "(pass --batch-size 256 --image-size 224 for the GPU setting)", flush=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    peak = bf16_peak_flops(device)
    spec, name = spec_peak_flops(device)
    if peak:
        print(f"{name}: measured bf16 matmul peak {peak / 1e12:.0f} TFLOP/s; data-sheet dense bf16 peak "
              f"{f'{spec / 1e12:.0f} TFLOP/s' if spec else 'unknown (mfu_spec_pct left empty)'}")
    rows, out = [], output_dir(args, device)
    for mode in modes:
        for batch in batches:
            base = None
            for pattern in args.patterns.split(","):
                print(f"bench_train: timing {args.arch} {pattern} (mode {mode}, batch {batch}, "
                      f"{args.warmup} warm-up + {args.steps} timed steps) ...", flush=True)
                try:
                    r = run_one(args.arch, pattern, mode, batch, args, device, peak)
                except torch.OutOfMemoryError:
                    r = {"arch": args.arch, "pattern": pattern, "mode": mode, "batch": batch,
                         "image": args.image_size, "step_ms": None, "img_per_s": None, "note": "out of memory"}
                if device.type == "cuda":
                    torch.cuda.empty_cache()  # the previous pattern's model and optimizer are gone
                if pattern == "single":
                    base = r
                if base is not None and base.get("img_per_s") and r.get("img_per_s"):
                    r["time_vs_single"] = base["img_per_s"] / r["img_per_s"]
                    if r["peak_mem_mb"] and base["peak_mem_mb"]:
                        r["mem_vs_single"] = r["peak_mem_mb"] / base["peak_mem_mb"]
                rows.append(r)
                print(format_row(r), flush=True)
                save("bench_train", rows, device, argv, COLUMNS, out)  # after every row: a cut-off run keeps its rows
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
