"""The run folder (one live run at a time, earlier runs need --resume or --overwrite, stale temp files) and
checkpoint state restored with one-line errors."""

import subprocess
import sys
import time

import pytest
import torch
from conftest import CPU_DIGITS

from collab_fast.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from collab_fast.run_state import RunDir, State, restore, snapshot


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


def test_full_disk_while_claiming_is_one_line_and_leaves_no_lock(tmp_path, monkeypatch):
    import errno

    from collab_fast import run_state

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(run_state.os, "pwrite", full)
    with pytest.raises(CheckpointError) as info:
        RunDir(tmp_path / "run", resume=False, overwrite=False, main=True)
    msg = str(info.value)
    assert "\n" not in msg and "cannot claim the run directory (No space left on device)" in msg
    monkeypatch.undo()
    RunDir(tmp_path / "run", resume=False, overwrite=False, main=True).close()  # the lock was released


def test_config_json_write_error_is_one_line_and_never_torn(tmp_path, monkeypatch, capsys):
    import errno

    from collab_fast import checkpoint, train

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.os, "fsync", full)
    rc = train.main([*CPU_DIGITS, "--pattern", "single", "--max-steps", "1",
                     "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: cannot write ") and "config.json: No space left" in err[-1], err
    assert not (tmp_path / "run" / "config.json").exists() and not list((tmp_path / "run").glob(".*.tmp"))


def test_os_errors_reaching_the_trainer_are_one_line(monkeypatch, capsys):
    import errno

    from collab_fast import train

    def vanished(cfg):
        raise OSError(errno.EIO, "Input/output error", "/mnt/data/train/n01/x.JPEG")

    monkeypatch.setattr(train, "run", vanished)
    assert train.main(["digits", "--device", "cpu"]) == 2
    assert capsys.readouterr().err.strip() == "error: /mnt/data/train/n01/x.JPEG: Input/output error"


@pytest.mark.parametrize("name", [".lock", "metrics.jsonl", "summary.csv", "config.json", "last.pt", "best.pt",
                                  "head0.pth", "eval.json", "tb"])
def test_links_planted_in_a_run_folder_are_refused_and_their_targets_untouched(tmp_path, name):
    out, victim = tmp_path / "run", tmp_path / "victim"
    out.mkdir()
    victim.write_bytes(b"precious\nlast line")
    (out / name).symlink_to(victim)
    for resume, overwrite in ((True, False), (False, True), (False, False)):
        with pytest.raises(CheckpointError, match=f"{name} there is a symbolic link \\(to {victim}\\)") as info:
            RunDir(out, resume=resume, overwrite=overwrite, main=True)
        assert "\n" not in str(info.value)
    assert victim.read_bytes() == b"precious\nlast line"
    (out / name).unlink()
    RunDir(out, resume=True, overwrite=False, main=True).close()  # the folder itself is fine


def test_metrics_are_never_appended_through_a_link(tmp_path):
    # a link planted after the folder was claimed: opening it is refused (O_NOFOLLOW), its target untouched
    from collab_fast.metrics import Logger, Progress

    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\nlast line")
    (tmp_path / "metrics.jsonl").symlink_to(victim)
    with pytest.raises(ValueError, match="metrics.jsonl is a symbolic link"):
        Logger(tmp_path, True, Progress("off", 1, 0, 1.0, enabled=False))
    assert victim.read_bytes() == b"precious\nlast line"


def test_eval_only_with_a_planted_lock_link_is_one_line(tmp_path, capsys):
    from collab_fast import train

    out, victim = tmp_path / "run", tmp_path / "victim"
    out.mkdir()
    victim.write_bytes(b"precious")
    (out / ".lock").symlink_to(victim)
    (tmp_path / "w.pth").write_bytes(b"")
    assert train.main([*CPU_DIGITS, "--output", str(out), "--eval-only",
                       "--resume", "auto", "--weights", str(tmp_path / "w.pth")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --output") and ".lock there is a symbolic link" in err and "\n" not in err
    assert victim.read_bytes() == b"precious"


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


def test_the_run_section_finds_the_checkpoint_to_resume(tmp_path):
    from collab_fast.run_state import RunConfig

    assert RunConfig().resume_path(tmp_path) is None  # no --resume: a fresh run
    assert RunConfig(resume="auto").resume_path(tmp_path) is None  # nothing to resume yet
    (tmp_path / "last.pt").write_bytes(b"x")
    assert RunConfig(resume="auto").resume_path(tmp_path) == tmp_path / "last.pt"
    other = tmp_path / "elsewhere.pt"
    other.write_bytes(b"x")
    assert RunConfig(resume=str(other)).resume_path(tmp_path / "run") == other
    with pytest.raises(ValueError, match="--eval-only --resume auto: .* does not exist"):
        RunConfig(resume="auto", eval_only=True).resume_path(tmp_path / "empty")
    assert RunConfig(resume="auto", eval_only=True).resume_path(tmp_path / "empty", weights="w.pth") is None
