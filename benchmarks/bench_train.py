"""Training throughput, memory and model-FLOPs utilisation of the trainer's own step, per pattern, with the
paper's Table 4 cost columns beside ours.

    python benchmarks/bench_train.py                        # GPU: resnet50 x patterns, 224 px, batch 256, bf16
    python benchmarks/bench_train.py --compile all          # eager, the model compiled, the whole step compiled
    python benchmarks/bench_train.py --quick                # CPU smoke test: resnet18, 32 px, batch 8

Each row: median step time over --steps timed steps after --warmup steps (CUDA events per step on GPU),
images/s = batch / median, peak memory (torch.cuda.max_memory_allocated over the timed steps), and MFU =
counted training FLOPs per image (3x forward, collab_fast.models.cost) x images/s / the measured bf16
matmul peak. Pattern "plain" is the baseline: the same ResNet as single, trained by a plain eager PyTorch
step (F.cross_entropy, backward, torch.optim.SGD, fused as the trainer's), same batch and precision. A
pattern that runs out of memory is recorded as such and the run goes on; the results are written after every
row. Data: synthetic tensors already on the device (the data pipeline is measured separately by bench_data.py),
or --data toy for DALI-decoded JPEGs where DALI runs.
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
from collab_fast.models import build_model  # noqa: E402
from collab_fast.models.cost import pattern_cost  # noqa: E402
from collab_fast.optim import make_optimizer  # noqa: E402
from collab_fast.step import Step  # noqa: E402

# Paper Table 4 (ResNet-50, ImageNet): training time and memory relative to one model.
PAPER_TABLE4 = {"single": (1.0, 1.0), "inst2": (2.0, 2.0), "ilr2": (1.4, 1.32), "hier4": (1.75, 1.5)}
COLUMNS = ["arch", "pattern", "compile", "batch", "image", "img_per_s", "step_ms", "peak_mem_mb", "mfu_pct",
           "time_vs_single", "mem_vs_single", "paper_time", "paper_mem", "note"]


def bf16_peak_flops(device: torch.device) -> float | None:
    """Measured dense bf16 matmul rate (FLOP/s): the denominator of MFU."""
    if device.type != "cuda":
        return None
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = bench(lambda: a @ b, device)
    return 2 * n**3 / (ms * 1e-3)


def time_steps(step, steps: int, warmup: int, device: torch.device) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
        for start, end in events:
            start.record()
            step()
            end.record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in events]
    else:
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def _plain_step(cfg, model, net, mode="off"):
    """The baseline: what a plain PyTorch training loop does for one network (no collab_fast code); under
    mode "step" compiled as the trainer's --compile-step compiles its own (forward and backward with
    compiled autograd, then the update, the learning rate a tensor), so that the ratio compares like with like."""
    lr = torch.tensor(0.1, device=next(net.parameters()).device) if mode == "step" else 0.1
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4, fused=True)
    amp = torch.bfloat16 if cfg.optim.amp == "bf16" else None

    def micro(x, y):
        with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
            loss = F.cross_entropy(model(x), y)
        loss.backward()

    update = optimizer.step
    if mode == "step":
        with torch._dynamo.config.patch(compiled_autograd=True):
            micro = torch.compile(micro)
        update = torch.compile(update)

    def step(x, y):
        micro(x, y)
        update()
        optimizer.zero_grad(set_to_none=True)

    return step


def run_one(arch, pattern, mode, args, device, peak):
    """One row; mode: "off" (eager), "model" (torch.compile of the model: --compile) or "step" (--compile-step)."""
    cuda = device.type == "cuda"
    cfg = TrainConfig.from_flags(args.data, arch=arch, pattern="single" if pattern == "plain" else pattern,
                                 batch_size=args.batch_size, lr=0.1, amp="bf16" if cuda else "off", channels_last=cuda,
                                 compile=mode == "model", compile_step=mode == "step", image_size=args.image_size,
                                 synthetic_steps=10**9)
    train, _, classes = build_loaders(cfg.data, batch_size=args.batch_size, device=device, channels_last=cuda,
                                      synthetic_classes=1000)
    model = build_model(cfg.model, classes, device)
    optimizer = make_optimizer(model, cfg.optim)
    runner = torch.compile(model) if mode == "model" else model
    train_step = Step(cfg, runner, model, optimizer) if pattern != "plain" else _plain_step(cfg, runner, model, mode)
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
    times = time_steps(step, args.steps, args.warmup, device)
    step_ms = statistics.median(times)
    img_s = args.batch_size / (step_ms * 1e-3)
    cost = pattern_cost(arch, cfg.model.pattern, args.image_size, classes)
    mem = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None
    return {"arch": arch, "pattern": pattern, "compile": mode, "batch": args.batch_size, "image": args.image_size,
            "img_per_s": img_s, "step_ms": step_ms, "peak_mem_mb": mem,
            "mfu_pct": 100 * cost.train_flops * img_s / peak if peak else None,
            "paper_time": PAPER_TABLE4.get(pattern, (None, None))[0] if arch == "resnet50" else None,
            "paper_mem": PAPER_TABLE4.get(pattern, (None, None))[1] if arch == "resnet50" else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--patterns", default="plain,single,ilr2,hier4,inst2,inst4",
                   help="comma list; plain = the same network by a plain eager PyTorch step (the baseline)")
    p.add_argument("--batch-size", type=int, default=None, help="default: 256 on a GPU, 16 on CPU")
    p.add_argument("--image-size", type=int, default=None, help="default: 224 on a GPU, 64 on CPU")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--compile", choices=["off", "model", "step", "both", "all"], default="off",
                   help="model: torch.compile of the model (--compile); step: the whole step (--compile-step); "
                        "both: off and model; all: the three")
    p.add_argument("--data", choices=["synthetic", "toy"], default="synthetic")
    p.add_argument("--quick", action="store_true", help="tiny CPU-sized run (a smoke test)")
    add_output_args(p)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.quick:
        args.arch, args.batch_size, args.image_size, args.steps, args.warmup = "resnet18", 8, 32, 3, 1
        args.patterns = "plain,single,hier4"
    gpu = device.type == "cuda"
    if args.batch_size is None or args.image_size is None:
        args.batch_size = args.batch_size or (256 if gpu else 16)
        args.image_size = args.image_size or (224 if gpu else 64)
        if not gpu:  # GPU-scale defaults would run for many minutes on CPU without a word
            print(f"bench_train: no GPU: CPU-sized defaults, batch {args.batch_size} at {args.image_size} px "
                  "(pass --batch-size 256 --image-size 224 for the GPU setting)", flush=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    peak = bf16_peak_flops(device)
    if peak:
        print(f"measured bf16 matmul peak: {peak / 1e12:.0f} TFLOP/s")
    rows, out = [], output_dir(args, device)
    modes = {"both": ["off", "model"], "all": ["off", "model", "step"]}.get(args.compile, [args.compile])
    for mode in modes:
        base = None
        for pattern in args.patterns.split(","):
            print(f"bench_train: timing {args.arch} {pattern} (compile {mode}, "
                  f"{args.warmup} warm-up + {args.steps} timed steps) ...", flush=True)
            try:
                r = run_one(args.arch, pattern, mode, args, device, peak)
            except torch.OutOfMemoryError:
                r = {"arch": args.arch, "pattern": pattern, "compile": mode, "batch": args.batch_size,
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
