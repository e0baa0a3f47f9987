"""The run folder (one live run at a time, earlier runs need --resume or --overwrite, stale temp files) and
checkpoint state restored with one-line errors."""

import subprocess
import sys
import time

import pytest
import torch

from collab_fast.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from collab_fast.run_state import RunDir, State, finite_model, restore, snapshot


def _net_opt():
    net = torch.nn.Linear(3, 2)
    return net, torch.optim.SGD(net.parameters(), lr=0.1)


def test_second_live_run_is_refused_then_allowed_after_the_first_ends(tmp_path):
    first = RunDir(tmp_path / "run", resume=False, overwrite=False, main=True)
    with pytest.raises(CheckpointError, match=r"is in use by a live run \(process \d+\)"):
        RunDir(tmp_path / "run", resume=True, overwrite=False, main=True)
    first.close()
    RunDir(tmp_path / "run", resume=True, overwrite=False, main=True).close()


def test_lock_of_a_killed_run_is_released(tmp_path):
    # flock dies with its owner: a run killed with SIGKILL never blocks the next one.
    code = ("import sys, time; from collab_fast.run_state import RunDir; "
            f"RunDir({str(tmp_path / 'run')!r}, resume=False, overwrite=False, main=True); print('held', flush=True); "
            "time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(CheckpointError, match="live run"):
        RunDir(tmp_path / "run", resume=True, overwrite=False, main=True)
    proc.kill()
    proc.wait()
    time.sleep(0.1)
    RunDir(tmp_path / "run", resume=True, overwrite=False, main=True).close()


def test_earlier_run_needs_resume_or_overwrite(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("{}\n")
    (out / "tb").mkdir()
    with pytest.raises(CheckpointError, match="holds an earlier run .*--resume auto.*--overwrite"):
        RunDir(out, resume=False, overwrite=False, main=True)
    RunDir(out, resume=True, overwrite=False, main=True).close()
    assert (out / "metrics.jsonl").exists()
    RunDir(out, resume=False, overwrite=True, main=True).close()
    assert not (out / "metrics.jsonl").exists() and not (out / "tb").exists()


def test_output_that_is_a_file_or_under_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(CheckpointError, match="--output .*f is a file; give a directory"):
        RunDir(tmp_path / "f", resume=False, overwrite=False, main=True)
    with pytest.raises(CheckpointError, match="--output .*f/run: cannot create the run directory"):
        RunDir(tmp_path / "f" / "run", resume=False, overwrite=False, main=True)


def test_stale_temp_files_of_killed_saves_are_removed(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".last.pt.abc123.tmp").write_bytes(b"partial")
    RunDir(out, resume=True, overwrite=False, main=True).close()
    assert not list(out.glob(".*.tmp"))


def test_snapshot_restore_round_trip(tmp_path):
    net, opt = _net_opt()
    state = State(step=5, epoch=1, batch_in_epoch=2, loader_state=["pos"])
    snapshot(tmp_path / "last.pt", net, opt, None, {"arch": "a", "pattern": "p"}, state)
    net2, opt2 = _net_opt()
    got = restore(tmp_path / "last.pt", net2, opt2, None, "a", "p")
    assert got == state and torch.equal(net.weight, net2.weight)


@pytest.mark.parametrize("damage, match", [
    (lambda c: c.pop("rng"), "does not fit this run: 'rng'"),
    (lambda c: c["state"].update(future_key=1), r"unknown training-state keys \['future_key'\]"),
    (lambda c: c["model"].pop("bias"), "does not fit this run: Error"),
    (lambda c: c["config"].update(pattern="hier4"), "is a a hier4 run, not a p"),
])
def test_restore_errors_are_one_line(tmp_path, damage, match):
    net, opt = _net_opt()
    snapshot(tmp_path / "last.pt", net, opt, None, {"arch": "a", "pattern": "p"}, State(step=1))
    ckpt = load_checkpoint(tmp_path / "last.pt")
    damage(ckpt)
    save_checkpoint(ckpt, tmp_path / "bad.pt")  # well-formed file, wrong content
    with pytest.raises(CheckpointError, match=match) as info:
        restore(tmp_path / "bad.pt", *_net_opt(), None, "a", "p")
    assert "\n" not in str(info.value)


def test_finite_model_sees_buffers():
    net = torch.nn.BatchNorm1d(3)
    assert finite_model(net)
    net.running_mean[1] = float("nan")
    assert not finite_model(net)
