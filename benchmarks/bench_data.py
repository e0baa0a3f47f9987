"""Images per second of the training input pipeline alone (no model): DALI decode + random resized crop +
flip + normalise, on toy JPEGs of ImageNet-like size (500x375 by default).

    python benchmarks/bench_data.py                   # GPU (mixed decode) where present, else CPU operators
    python benchmarks/bench_data.py --quick           # small folder, few batches (smoke test)

The rate is images over wall time of whole epochs after one warm-up epoch, with the device synchronised at
the end of each (the pipeline's output must be ready, not just enqueued); the median over epochs is
reported. Target (issue 5, H100): at least twice the single-head ResNet-50 training rate.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_output_args, format_row, output_dir, save  # noqa: E402

from collab_fast.data import DaliLoader, scan_split, write_toy  # noqa: E402

COLUMNS = ["images", "size", "batch", "threads", "device", "img_per_s", "epochs"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="an ImageNet-format folder (default: a generated toy folder)")
    p.add_argument("--size", default="500x375", help="toy image size WxH")
    p.add_argument("--per-class", type=int, default=64)
    p.add_argument("--classes", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="DALI CPU threads (default: min(8, cores))")
    p.add_argument("--quick", action="store_true")
    add_output_args(p)
    args = p.parse_args(argv)
    if args.quick:
        args.per_class, args.classes, args.batch_size, args.epochs, args.size = 4, 4, 8, 2, "128x96"
    device_id = torch.cuda.current_device() if torch.cuda.is_available() else None
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data or write_toy(Path(tmp) / "toy", args.classes, args.per_class, args.size, val_per_class=1)
        files, labels, classes = scan_split(root, "train")
        threads = args.threads or max(1, min(8, os.cpu_count() or 1))
        loader = DaliLoader(files, labels, args.batch_size, train=True, num_classes=len(classes),
                            device_id=device_id, image_size=args.image_size, threads=threads)
        rates = []
        for epoch in range(args.epochs + 1):
            t0 = time.perf_counter()
            n = 0
            for x, _ in loader:
                n += x.shape[0]
            if device_id is not None:
                torch.cuda.synchronize()
            if epoch > 0:  # epoch 0 warms up
                rates.append(n / (time.perf_counter() - t0))
    row = {"images": len(files), "size": args.size if not args.data else "folder", "batch": args.batch_size,
           "threads": threads, "device": "gpu (mixed decode)" if device_id is not None else "cpu operators",
           "img_per_s": statistics.median(rates), "epochs": len(rates)}
    print(format_row(row))
    dev = torch.device("cuda" if device_id is not None else "cpu")
    save("bench_data", [row], dev, argv, COLUMNS, output_dir(args, dev))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
