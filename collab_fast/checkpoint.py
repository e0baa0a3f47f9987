"""Checkpoints: written atomically (temp file in the same directory, fsync, rename), loaded with
torch.load(weights_only=True) and verified, with one-line errors for missing, corrupt or foreign files.

A training checkpoint is a dict with FORMAT under "format", the model's state dict under "model" and the
resolved run config (a plain dict) under "config"; the trainer adds the optimizer's, the scaler's and the
EMA's state, the training position (run_state.State: step, epoch, the loader's position) and the RNG states.
The learning-rate schedule keeps no state: it is a function of the step and the config. A checkpoint
carries a checksum of its whole content ("checksum": every tensor's bytes and every other value), which
loading requires and verifies: flipped bytes inside a tensor or a number, which unpickling cannot notice,
are refused, and so is a checkpoint without one. An exported head is a plain state dict (no checksum, so
that torchvision and others load it as it is).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["FORMAT", "CheckpointError", "checksum", "is_checkpoint", "load_checkpoint", "load_file", "save_atomic",
           "save_checkpoint", "verify_checkpoint"]

FORMAT = "collab_fast.checkpoint/2"  # 2: the checksum covers every value and is required
_RETIRED = ("collab_fast.checkpoint/1",)  # development versions' formats (checksums optional or tensors-only)


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, corrupt, or not one of ours."""


_CHECKSUM_PREFIX = "blake2b-all:"


def _leaves(obj, prefix=""):
    """(path, leaf) of every value in nested dicts, lists and tuples, in a fixed order."""
    if isinstance(obj, dict):
        for k in sorted(obj, key=str):
            yield from _leaves(obj[k], f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _leaves(v, f"{prefix}/{i}")
    else:
        yield prefix, obj


def checksum(obj) -> str:
    """blake2b over every tensor's path, dtype, shape and bytes (CPU tensors) and every other leaf's repr."""
    h = hashlib.blake2b(digest_size=16)
    for path, v in _leaves(obj):
        if isinstance(v, torch.Tensor):
            t = v.detach().contiguous()
            h.update(f"{path}:{t.dtype}:{tuple(t.shape)};".encode())
            if t.numel():
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.dtype != torch.bool
                         else t.numpy().tobytes())
        else:
            h.update(f"{path}={v!r};".encode())
    return _CHECKSUM_PREFIX + h.hexdigest()


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_cpu(v) for v in obj)
    return obj


def _file_mode() -> int:
    """What open() would give a new file under the current umask (mkstemp's temp files are 0600: a
    teammate could not read a checkpoint or an exported head)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def os_error_line(exc: OSError) -> str:
    """An OS error as one line naming the file: '/path: No space left on device'."""
    why = exc.strerror or str(exc) or type(exc).__name__
    return f"{exc.filename}: {why}" if exc.filename else why


def _write_atomic(path: str | os.PathLike, write: Callable[[Any], Any]) -> Path:
    """write(f) into a temp file beside `path`, fsync, then rename: a crash never leaves a truncated file,
    and a failed write (full disk, no permission) keeps the old file, removes the temp file, and raises a
    CheckpointError naming the path and the OS error."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, _file_mode())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        err = exc
        while err is not None and not isinstance(err, OSError):  # torch wraps the OS error in a RuntimeError
            err = err.__cause__ or err.__context__
        if isinstance(err, OSError) or (isinstance(exc, RuntimeError) and "write" in str(exc).lower()):
            why = err.strerror if isinstance(err, OSError) and err.strerror else str(exc).splitlines()[0]
            raise CheckpointError(f"cannot write {path}: {why} (the previous file, if any, is kept)") from None
        raise
    return path


def save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save(obj) to `path`, atomically (see _write_atomic)."""
    return _write_atomic(path, lambda f: torch.save(obj, f))


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """A small text file (config.json, eval.json, a grid cell's result.json), atomically: never torn."""
    return _write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def save_checkpoint(ckpt: dict, path: str | os.PathLike) -> Path:
    """A training checkpoint (a dict with FORMAT), moved to the CPU, checksummed, written atomically."""
    ckpt = _to_cpu({k: v for k, v in ckpt.items() if k != "checksum"})
    ckpt["checksum"] = checksum(ckpt)
    return save_atomic(ckpt, path)


def load_file(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """torch.load(weights_only=True) with errors that name the file and say what is wrong."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory, expected a file written by torch.save")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # any failure of a damaged or foreign file: zip, pickle, index, type errors
        text = str(exc).strip()
        first = text.splitlines()[0][:200] if text else type(exc).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt, truncated, or not a torch.save file "
                              f"(safe loading with weights_only=True failed: {first})") from None


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Loads a collab_fast training checkpoint to the CPU, checks its structure and verifies its checksum."""
    return verify_checkpoint(load_file(path), path)


def is_checkpoint(obj: Any) -> bool:
    """Whether `obj` (a file's content) claims to be a training checkpoint of some format of ours (then
    verify_checkpoint decides), rather than a plain state dict."""
    return isinstance(obj, dict) and obj.get("format") in (FORMAT, *_RETIRED)


def verify_checkpoint(ckpt: Any, path: str | os.PathLike) -> dict:
    """The structure and checksum checks of load_checkpoint, on an object already read from `path`."""
    if isinstance(ckpt, dict) and ckpt.get("format") in _RETIRED:
        raise CheckpointError(f"{path} was written by a development version of collab_fast (format "
                              f"{ckpt['format']!r}, whose checksum was optional); this version reads {FORMAT!r} "
                              "only: train again (its weights: torch.load(path, weights_only=True)['model'])")
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        what = f"a {type(ckpt).__name__}" if not isinstance(ckpt, dict) else f"a dict with keys {sorted(map(str, ckpt))[:8]}"
        raise CheckpointError(f"{path} is not a collab_fast training checkpoint (expected format {FORMAT!r}, "
                              f"found {what}); for a plain state dict use torch.load")
    for key in ("model", "config"):
        if not isinstance(ckpt.get(key), dict):
            raise CheckpointError(f"{path}: the checkpoint has no {key!r} dict")
    stored = ckpt.pop("checksum", None)
    if not isinstance(stored, str) or not stored.startswith(_CHECKSUM_PREFIX):
        raise CheckpointError(f"{path} has no checksum, so it cannot be verified: it was not written by "
                              "collab_fast's save_checkpoint (use another checkpoint, e.g. best.pt, or start over)")
    if checksum(ckpt) != stored:
        raise CheckpointError(f"{path} is corrupt: its content does not match the checksum written with it "
                              "(use another checkpoint, e.g. best.pt, or start over)")
    return ckpt
