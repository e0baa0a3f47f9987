"""Meters (device sums, optimizer-step timing), progress (bar, plain lines, off) and log lines."""

import json

import pytest
import torch
from conftest import CPU_ARCH

from collab_fast.distributed import Dist
from collab_fast.kernels.collab_loss import CollabStats
from collab_fast.metrics import Logger, Meter, Progress, hms


def _stats(n, correct):
    return CollabStats(hard=torch.tensor([1.0, 2.0]), soft=torch.tensor([0.5, 0.5]),
                       correct=torch.tensor(correct), num_valid=torch.tensor(float(n)))


def test_meter_weights_micro_batches_by_samples_and_counts_optimizer_steps():
    m = Meter(2, torch.device("cpu"))
    m.add(torch.tensor(3.0), _stats(4, [4.0, 2.0]))  # two micro-batches of one optimizer step
    m.add(torch.tensor(1.0), _stats(12, [6.0, 6.0]))
    m.step_done(16)
    rec = m.read(Dist())
    assert rec["loss"] == (3 * 4 + 1 * 12) / 16 and rec["samples"] == 16
    assert rec["train_acc"] == [10 / 16, 8 / 16] and rec["hard"] == [1.0, 2.0]
    assert rec["sec_per_step"] > 0 and rec["img_per_s"] > 0  # per optimizer step, not per micro-batch


def test_progress_lines_when_not_a_terminal(capsys, monkeypatch):
    clock = iter(range(0, 1000, 10))  # every update is 10 s after the previous one
    monkeypatch.setattr("collab_fast.metrics.time.perf_counter", lambda: float(next(clock)))
    p = Progress("auto", total_steps=100, done_steps=0, every=25.0, enabled=True)  # pytest's stderr: no tty
    assert p.mode == "lines"
    for step in range(1, 8):
        p.update(1, 2, step, 32)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("progress:")]
    assert len(lines) == 2  # one every 25 s of the 70 s
    assert lines[0].startswith("progress: epoch 1/2 step 3/100") and "img/s ETA" in lines[0]


def test_progress_off_and_disabled_ranks_print_nothing(capsys):
    for p in (Progress("off", 10, 0, 0.001, enabled=True), Progress("lines", 10, 0, 0.001, enabled=False)):
        for step in range(1, 5):
            p.update(1, 1, step, 8)
        p.close()
    assert capsys.readouterr().out == ""


def test_progress_bar_with_tqdm(capsys):
    p = Progress("bar", 10, 2, 30.0, enabled=True)
    assert p.bar is not None and p.bar.n == 2
    p.update(1, 1, 5, 8)
    p.postfix({"loss": 1.0, "train_acc": [0.5, 0.25], "img_per_s": 100.0})
    assert p.bar.n == 5
    p.write("a log line")
    p.close()
    assert "a log line" in capsys.readouterr().out


def test_logger_records_start_train_and_eval(tmp_path, capsys):
    log = Logger(tmp_path, True, Progress("off", 1, 0, 1.0, enabled=True))
    log({"step": 1, "epoch": 1, "epochs": 2, "loss": 1.5, "lr": 0.1, "train_acc": [0.5], "img_per_s": 10.0,
         "peak_rss_mb": 100.0, "eta_s": 65.0}, kind="train")
    log({"step": 1, "epoch": 1, "epochs": 2, "top1": 50.0, "top5": 90.0, "top1_heads": [50.0],
         "top1_ensemble": 50.0, "val_loss_head0": 1.0, "val_loss": 1.0}, kind="eval")
    log.close()
    kinds = [json.loads(ln)["kind"] for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert kinds == ["start", "train", "eval"]
    out = capsys.readouterr().out
    assert "epoch 1/2 step 1: loss 1.5000" in out and "ETA 0:01:05" in out and "epoch 1/2 eval" in out
    assert hms(3725) == "1:02:05" and hms(float("nan")) == "--:--:--"


def test_a_torn_line_is_repaired_before_appending(tmp_path):
    from collab_fast.metrics import Logger, Progress
    from collab_fast.report import load_run

    path = tmp_path / "metrics.jsonl"
    good = json.dumps({"kind": "start", "time": 1.0})
    path.write_text(good + "\n" + '{"kind": "train", "time": 2.0, "st')  # cut mid-write
    log = Logger(tmp_path, True, Progress("off", 1, 0, 30.0, enabled=False))
    log.close()
    lines = path.read_text().splitlines()
    assert lines[0] == good and len(lines) == 2 and json.loads(lines[1])["kind"] == "start"
    assert load_run(tmp_path)["eval"] == []


def test_a_failed_metrics_write_leaves_no_partial_line_and_is_one_line(tmp_path):
    from collab_fast.metrics import Logger, Progress

    log = Logger(tmp_path, True, Progress("off", 1, 0, 30.0, enabled=False))
    log.tb = None
    real = log.file

    class Full:
        def tell(self):
            return real.tell()

        def write(self, s):
            real.write(s[: len(s) // 2])
            real.flush()
            raise OSError(28, "No space left on device")

        def flush(self):
            real.flush()

        def truncate(self, pos):
            real.truncate(pos)

    log.file = Full()
    with pytest.raises(ValueError, match="cannot write .*metrics.jsonl .No space left on device"):
        log({"step": 1}, "custom")
    real.close()
    assert all(json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines())


def test_train_line_labels_the_summed_loss_and_shows_head0_ce_first():
    rec = {"step": 3, "epoch": 1, "epochs": 2, "loss": 23.1, "hard": [2.31, 2.30, 2.29, 2.32], "lr": 0.1,
           "train_acc": [0.1] * 4, "img_per_s": 10.0, "peak_rss_mb": 100.0, "eta_s": 5.0}
    line = Logger.line(rec, "train")
    assert line.startswith("epoch 1/2 step 3: CE head0 2.3100, collaborative loss 23.1000 (sum over 4 heads) lr 0.1")
    one = Logger.line({**rec, "loss": 2.31, "hard": [2.31], "train_acc": [0.1]}, "train")
    assert "CE head0 2.3100, loss 2.3100 lr" in one


def test_summary_csv_has_a_row_per_evaluation(tmp_path):
    import csv

    from collab_fast import train

    out = tmp_path / "run"
    args = ["digits", "--device", "cpu", "--arch", CPU_ARCH, "-b", "64", "--epochs", "2", "--train-samples", "256",
            "--output", str(out), "--log-every", "2", "--model-ema", "0.9"]
    assert train.main(args) == 0
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"] and [r["step"] for r in rows] == ["4", "8"]
    assert list(rows[0]) == ["epoch", "step", "lr", "train_loss", "train_hard_head0", "eval_loss_head0", "eval_top1",
                             "eval_top5", "eval_top1_ensemble", "ema_eval_top1", "ema_eval_top5"]
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r["kind"] == "eval"]
    assert [float(r["eval_top1"]) for r in rows] == pytest.approx([e["top1"] for e in evals], abs=1e-4)
    # resumed to more epochs: the rows continue, none repeated
    assert train.main(args[:-6] + ["--epochs", "3", "--output", str(out), "--log-every", "2", "--model-ema", "0.9",
                                   "--resume", "auto"]) == 0
    assert [r["epoch"] for r in csv.DictReader(open(out / "summary.csv"))] == ["1", "2", "3"]


_FULL_DISK = """
import errno, sys, time
from pathlib import Path
from tensorboard.summary.writer import record_writer
from collab_fast.metrics import Logger, Progress
real, calls = record_writer.RecordWriter.write, []
def full_after_the_first(self, data):  # the first event is written as the writer opens; then the disk fills
    calls.append(1)
    if len(calls) > 1:
        raise OSError(errno.ENOSPC, "No space left on device")
    return real(self, data)
record_writer.RecordWriter.write = full_after_the_first
log = Logger(Path(sys.argv[1]), True, Progress("off", 1, 0, 1.0, enabled=False))
assert log.tb is not None
rec = {"step": 1, "epoch": 1, "epochs": 1, "loss": 1.0, "hard": [1.0], "train_acc": [0.5], "lr": 0.1,
       "img_per_s": 1.0, "eta_s": 0.0, "sec_per_step": 1.0}
for _ in range(3):
    log(rec, kind="train")
    time.sleep(0.3)
log.close()
"""


def test_a_full_disk_under_tensorboard_is_one_warning_not_a_thread_traceback(tmp_path):
    # TensorBoard writes from a thread, which re-raises the write error: without a word from us, Python
    # prints that thread's traceback (a subprocess: pytest would catch it as a warning)
    import subprocess
    import sys

    pytest.importorskip("tensorboard.summary.writer.record_writer")
    res = subprocess.run([sys.executable, "-c", _FULL_DISK, str(tmp_path)], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Traceback" not in res.stderr, res.stderr
    assert res.stderr.count("TensorBoard events stopped (No space left on device)") == 1, res.stderr
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 4  # metrics.jsonl goes on


def test_a_tensorboard_folder_that_cannot_be_written_is_a_warning(tmp_path, capsys):
    pytest.importorskip("torch.utils.tensorboard")
    (tmp_path / "tb").write_text("")  # a file where the events folder goes
    log = Logger(tmp_path, True, Progress("off", 1, 0, 1.0, enabled=False))
    assert log.tb is None and log.file is not None
    log.close()
    assert "warning: no TensorBoard events" in capsys.readouterr().err
