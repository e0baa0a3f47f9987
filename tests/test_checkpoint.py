"""Checkpoint files: checksums catch flipped bytes, write errors are one line, damaged files never escape as
anything but a CheckpointError (fuzzed)."""

import errno
import os
import random

import pytest
import torch

import collab_fast.checkpoint as ck
from collab_fast.checkpoint import (
    FORMAT,
    CheckpointError,
    checksum,
    load_checkpoint,
    load_file,
    save_atomic,
    save_checkpoint,
)

MARK = torch.arange(4096, dtype=torch.float32) + 0.5  # distinctive bytes to find in the file


def _ckpt():
    return {"format": FORMAT, "model": {"w": MARK.clone(), "b": torch.zeros(3)}, "config": {"lr": 0.1},
            "state": {"step": 7, "loader_state": ["abc"]}, "rng": {"python": [3, (1, 2, 3), None]}}


def _one_change_each(obj):
    """Copies of `obj`, each with one thing changed: every leaf once (a tensor by one element, by its dtype and
    by its shape; any other value replaced), every dict key once (renamed)."""
    if isinstance(obj, torch.Tensor):
        t = obj.clone()
        t.view(-1)[-1] += 1
        yield t
        yield obj.double()
        yield obj.unsqueeze(0)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield {(f"{k}_" if j == k else j): w for j, w in obj.items()}
            for changed in _one_change_each(v):
                yield {**obj, k: changed}
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            for changed in _one_change_each(v):
                yield type(obj)([*obj[:i], changed, *obj[i + 1:]])
    else:
        yield ("changed", obj)


def test_round_trip_and_checksum_covers_every_value(tmp_path):
    path = save_checkpoint(_ckpt(), tmp_path / "a.pt")
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["model"]["w"], MARK) and loaded["state"]["step"] == 7
    base = checksum(_ckpt())
    variants = list(_one_change_each(_ckpt()))
    leaves = sum(1 for _ in ck._leaves(_ckpt()))
    assert len(variants) > leaves >= 9  # every leaf and key of the checkpoint
    sums = [checksum(v) for v in variants]
    assert base not in sums and len(set(sums)) == len(sums)  # each change is seen, and told apart


def test_flipped_tensor_bytes_are_refused(tmp_path):
    path = save_checkpoint(_ckpt(), tmp_path / "a.pt")
    data = bytearray(path.read_bytes())
    at = data.find(MARK.numpy().tobytes()[:256])
    assert at > 0
    for i in range(at + 1024, at + 1024 + 64):  # 64 bytes inside the tensor; unpickling cannot notice
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    assert torch.load(path, weights_only=True)["model"]["w"].shape == MARK.shape  # loads without checksum
    with pytest.raises(CheckpointError, match="corrupt: its content does not match the checksum"):
        load_checkpoint(path)


@pytest.mark.parametrize("change, match", [
    (lambda c: c.pop("checksum"), "has no checksum, so it cannot be verified"),
    (lambda c: c.update(checksum="0" * 32), "has no checksum"),  # a development version's tensors-only checksum
    (lambda c: c.update(format="collab_fast.checkpoint/1"), "written by a development version .* train again"),
])
def test_a_checkpoint_that_cannot_be_verified_is_refused_in_one_line(tmp_path, change, match):
    save_checkpoint(_ckpt(), tmp_path / "a.pt")
    ckpt = torch.load(tmp_path / "a.pt", weights_only=True)
    change(ckpt)
    save_atomic(ckpt, tmp_path / "b.pt")
    with pytest.raises(CheckpointError, match=match) as info:
        load_checkpoint(tmp_path / "b.pt")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EACCES, errno.EIO])
def test_write_error_is_one_line_naming_the_file(tmp_path, monkeypatch, err):
    path = tmp_path / "last.pt"
    save_checkpoint(_ckpt(), path)

    def failing_fsync(fd):
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(ck.os, "fsync", failing_fsync)
    with pytest.raises(CheckpointError) as info:
        save_checkpoint({**_ckpt(), "config": {"lr": 0.2}}, path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg and os.strerror(err) in msg and "previous file" in msg
    monkeypatch.undo()
    assert load_checkpoint(path)["config"]["lr"] == 0.1  # the old file is intact
    assert sorted(os.listdir(tmp_path)) == ["last.pt"]  # and no temp file is left


def test_path_under_a_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match=r"cannot write .*file/sub/last.pt"):
        save_checkpoint(_ckpt(), tmp_path / "file" / "sub" / "last.pt")


def test_fuzz_random_truncated_and_mutated_files(tmp_path):
    """A few hundred damaged files: every one is either loaded and verified, or a CheckpointError."""
    good = save_checkpoint(_ckpt(), tmp_path / "good.pt").read_bytes()
    rng = random.Random(0)
    path = tmp_path / "fuzz.pt"
    loaded = 0
    for i in range(300):
        kind = i % 3
        if kind == 0:  # random bytes, sometimes with a zip header
            data = (b"PK\x03\x04" if i % 2 else b"") + rng.randbytes(rng.randrange(0, 4096))
        elif kind == 1:  # truncated at a random point
            data = good[: rng.randrange(0, len(good))]
        else:  # a few random bytes overwritten anywhere
            data = bytearray(good)
            for _ in range(rng.randrange(1, 9)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            data = bytes(data)
        path.write_bytes(data)
        try:
            ckpt = load_checkpoint(path)
        except CheckpointError as exc:
            assert "\n" not in str(exc) and str(path) in str(exc)
            continue
        loaded += 1  # only if the damage missed everything that matters: then the content is intact
        assert torch.equal(ckpt["model"]["w"], MARK) and ckpt["state"]["step"] == 7
    assert loaded < 100


def test_written_files_get_the_umask_mode_not_0600(tmp_path):
    # mkstemp makes 0600 temp files; a checkpoint or an exported head must be readable as any new file is.
    old = os.umask(0o022)
    try:
        save_checkpoint(_ckpt(), tmp_path / "last.pt")
        ck.write_text_atomic(tmp_path / "config.json", "{}\n")
    finally:
        os.umask(old)
    assert (tmp_path / "last.pt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "config.json").stat().st_mode & 0o777 == 0o644


def test_corrupt_and_truncated_files(tmp_path):
    path = save_checkpoint(_ckpt(), tmp_path / "last.pt")
    data = path.read_bytes()
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt, truncated"):
        load_checkpoint(trunc)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="corrupt, truncated"):
        load_file(garbage)
    with pytest.raises(CheckpointError, match="is a directory"):
        load_file(tmp_path)


class Evil:
    """Not a tensor, not a plain container: weights_only loading must refuse it."""


def test_unsafe_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "model": {}, "config": {}, "obj": Evil()}, path)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_checkpoint(path)


def test_save_atomic_never_leaves_a_truncated_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_atomic({"a": torch.ones(3)}, path)
    real_save = torch.save

    def crash(obj, f):
        real_save(obj, f)
        f.write(b"partial")
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(ck.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_atomic({"a": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(3))
    assert os.listdir(tmp_path) == ["last.pt"]  # no temp file left behind
