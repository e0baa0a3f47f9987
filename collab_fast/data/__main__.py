"""Data tools.

    python -m collab_fast.data toy OUT --classes 10 --per-class 100 --size 160     # write a toy folder
    python -m collab_fast.data check DIR [--decode]                               # find unreadable images
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from collab_fast.cli import Parser
from collab_fast.data.images import IMAGE_EXTENSIONS, DataError, check_image, decode_image
from collab_fast.data.toy import write_toy
from collab_fast.extras import MissingExtra


def _check(root: Path, decode: bool) -> int:
    if not root.is_dir():
        print(f"error: {root} is not a directory", file=sys.stderr)
        return 2
    bad, n = [], 0
    for p in sorted(root.rglob("*")):
        if not p.is_file() or p.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        n += 1
        why = decode_image(p) if decode else check_image(p)
        if why:
            bad.append(p)
            print(f"{p}: {why}")
    print(f"checked {n} image file(s) under {root}: {len(bad)} bad")
    return 1 if bad else 0


def main(argv=None) -> int:
    p = Parser(prog="python -m collab_fast.data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("toy", help="write a deterministic, learnable ImageNet-format JPEG folder")
    t.add_argument("out")
    t.add_argument("--classes", type=int, default=10)
    t.add_argument("--per-class", type=int, default=100, help="training images per class")
    t.add_argument("--val-per-class", type=int, default=None, help="default: per-class / 5")
    t.add_argument("--size", default="160", help="N or WxH, e.g. 500x375")
    t.add_argument("--seed", type=int, default=0)
    c = sub.add_parser("check", help="list image files that cannot be read")
    c.add_argument("dir")
    c.add_argument("--decode", action="store_true", help="fully decode every image (slow, finds every bad file)")
    args = p.parse_args(argv)
    try:
        if args.cmd == "toy":
            try:
                out = write_toy(args.out, args.classes, args.per_class, args.size, args.val_per_class, args.seed)
            except OSError as exc:
                raise DataError(f"cannot write the toy folder {args.out}: {exc.strerror} ({exc.filename})") from None
            print(f"wrote {out}/train and {out}/val ({args.classes} classes)")
            return 0
        return _check(Path(args.dir), args.decode)
    except (DataError, MissingExtra) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        p.error(str(exc))


if __name__ == "__main__":
    raise SystemExit(main())
