"""Export one head of a collaborative checkpoint as a plain single-head network's state dict.

    python -m collab_fast.export CHECKPOINT --head 0 -o model.pth
    python -m collab_fast.export CHECKPOINT --ema -o model_ema.pth      # from the --model-ema average

The result loads with strict=True into build(arch, "single") and, for the ImageNet ResNets, into
torchvision.models.resnet* (identical parameter and buffer names).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from torch import nn

from collab_fast.checkpoint import CheckpointError, load_checkpoint, os_error_line, save_atomic
from collab_fast.cli import Parser
from collab_fast.data import data_channels
from collab_fast.extension import ExtensionError
from collab_fast.extras import MissingExtra
from collab_fast.models import ModelConfig, build_model, input_channels

__all__ = ["export_checkpoint", "model_from_config", "main"]


def model_from_config(config: dict) -> nn.Module:
    """Rebuilds the training model a checkpoint's (flat) config describes: its model section, less the
    initial weights (the checkpoint's own replace them)."""
    if "arch" not in config:
        raise CheckpointError("the checkpoint's config has no 'arch'")
    keep = {f.name for f in dataclasses.fields(ModelConfig)} - {"weights", "channels_last", "compile"}
    model = ModelConfig(**{k: v for k, v in config.items() if k in keep and v is not None})
    in_chans = input_channels(model.arch, data_channels(config["dataset"])) if config.get("dataset") else 3
    return build_model(model, config.get("num_classes"), in_chans=in_chans)


def export_checkpoint(checkpoint: str, head: int, output: str, ema: bool = False) -> nn.Module:
    ckpt = load_checkpoint(checkpoint)
    if ema and not ckpt.get("ema"):
        raise ValueError(f"--ema: {checkpoint} holds no weight average (the run was trained without --model-ema)")
    model = model_from_config(ckpt["config"])
    try:
        model.load_state_dict(ckpt["ema"] if ema else ckpt["model"], strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{checkpoint}: its weights do not fit the model its config describes "
                              f"({ckpt['config'].get('arch')}, {ckpt['config'].get('pattern')}): {exc}") from None
    if not 0 <= head < model.num_heads:
        raise ValueError(f"--head must be in [0, {model.num_heads}) for this {model.num_heads}-head checkpoint, got {head}")
    out = Path(output)
    if out.is_dir() or str(output).endswith(os.sep):
        raise ValueError(f"-o {output} is a directory; give a file name, e.g. {out / 'head0.pth'}")
    net = model.export_head(head)
    save_atomic(net.state_dict(), out)
    return net


def main(argv=None) -> int:
    p = Parser(prog="python -m collab_fast.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a training checkpoint (e.g. OUTPUT/last.pt or best.pt)")
    p.add_argument("--head", type=int, default=0, help="which head to keep (default 0, the one the paper reports)")
    p.add_argument("-o", "--output", required=True, help="where to write the state dict (.pth)")
    p.add_argument("--ema", action="store_true", help="export from the checkpoint's --model-ema weight average")
    args = p.parse_args(argv)
    try:
        net = export_checkpoint(args.checkpoint, args.head, args.output, args.ema)
    except (CheckpointError, ValueError, MissingExtra, ExtensionError) as exc:  # MissingExtra: a timm: / torchvision: model
        print(f"error: {str(exc).removeprefix('collab_fast: ')}", file=sys.stderr)
        return 2
    except OSError as exc:  # the output's folder: read-only, full, missing
        print(f"error: {os_error_line(exc)}", file=sys.stderr)
        return 2
    n = sum(t.numel() for t in net.state_dict().values())
    print(f"wrote {args.output}: head {args.head}{' of the weight average' if args.ema else ''} as "
          f"{type(net).__name__} ({n / 1e6:.2f}M values)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
