"""Checkpoints: written atomically (temp file in the same directory, fsync, rename) and loaded with
torch.load(weights_only=True), with clear errors for missing, corrupt or foreign files.

A training checkpoint is a dict with FORMAT under "format", the model's state dict under "model" and the
resolved run config (a plain dict) under "config"; the trainer adds optimizer, scaler, schedule, step and
RNG states. An exported head is a plain state dict.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["FORMAT", "CheckpointError", "load_checkpoint", "save_atomic"]

FORMAT = "collab_fast.checkpoint/1"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, corrupt, or not one of ours."""


def save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save to a temp file beside `path`, fsync, then rename: a crash never leaves a truncated file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def load_file(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """torch.load(weights_only=True) with errors that name the file and say what is wrong."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory, expected a file written by torch.save")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (zipfile.BadZipFile, EOFError, pickle.UnpicklingError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt, truncated, or not a torch.save file "
                              f"(safe loading with weights_only=True failed: {first})") from exc


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Loads a collab_fast training checkpoint and checks its structure."""
    ckpt = load_file(path, map_location)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        what = f"a {type(ckpt).__name__}" if not isinstance(ckpt, dict) else f"a dict with keys {sorted(ckpt)[:8]}"
        raise CheckpointError(f"{path} is not a collab_fast training checkpoint (expected format {FORMAT!r}, "
                              f"found {what}); for a plain state dict use torch.load")
    for key in ("model", "config"):
        if not isinstance(ckpt.get(key), dict):
            raise CheckpointError(f"{path}: the checkpoint has no {key!r} dict")
    return ckpt
