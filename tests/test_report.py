"""Run reports from short CPU runs, including one that was interrupted and resumed."""

import json

import pytest
from conftest import CPU_DIGITS

from collab_fast import train
from collab_fast.report import layer_weight_stats, load_run
from collab_fast.report import main as report_main

BASE = [*CPU_DIGITS, "-b", "64", "--log-every", "2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    single, hier = tmp / "single", tmp / "hier4"
    assert train.main([*BASE, "--pattern", "single", "--max-steps", "4", "--output", str(single)]) == 0
    # hier4: stopped at step 3, resumed to step 6: steps are logged again after the resume point.
    assert train.main([*BASE, "--pattern", "hier4", "--max-steps", "3", "--output", str(hier)]) == 0
    assert train.main([*BASE, "--pattern", "hier4", "--max-steps", "6", "--output", str(hier), "--resume", "auto"]) == 0
    return single, hier


def test_report_has_every_figure(runs, tmp_path):
    single, hier = runs
    assert report_main([str(single), str(hier), "--out", str(tmp_path)]) == 0
    html = (tmp_path / "report.html").read_text()
    for png in ("curves.png", "speed.png", "weights.png", "dead.png"):
        assert (tmp_path / png).stat().st_size > 5000
        assert f"src='{png}'" in html
    for text in ("top1_head0", "best_head", "top1_ensemble", "near-zero", "single", "hier4", "layer1.0.conv1"):
        assert text in html


def test_resumed_run_is_deduplicated(runs):
    _, hier = runs
    raw = [json.loads(line) for line in (hier / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in raw if r["kind"] == "train"]
    run = load_run(hier)
    assert [t["step"] for t in run["train"]] == sorted(set(steps)) and run["train"][-1]["step"] == 6
    assert len(run["train"][0]["train_acc"]) == 4


def test_report_from_checkpoint_without_head0(runs, tmp_path):
    _, hier = runs
    (hier / "head0.pth").rename(tmp_path / "moved.pth")  # as if the run had been killed before the end
    try:
        assert report_main([str(hier), "--out", str(tmp_path / "r")]) == 0
        assert (tmp_path / "r" / "weights.png").is_file()
    finally:
        (tmp_path / "moved.pth").rename(hier / "head0.pth")


def test_layer_stats():
    import torch

    w = {"a.weight": torch.tensor([[0.0, 0.0005, 0.5, -0.5]])}
    (row,) = layer_weight_stats(w, dead_threshold=1e-3)
    assert row["layer"] == "a" and row["dead"] == 0.5 and row["count"] == 4


def test_report_errors(tmp_path, capsys):
    assert report_main([str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


def _copy_run(src, dst):
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("tb", "*.pt"))
    return dst


@pytest.mark.parametrize("damage, match", [
    (lambda d: (d / "metrics.jsonl").write_text('{"kind": "train", "time": 1.0, "loss": 1}\n' * 3),
     r"metrics.jsonl:1: a train record without step"),
    (lambda d: (d / "metrics.jsonl").write_text("[1, 2]\n[3]\n"), r"metrics.jsonl:1 is not a collab_fast metrics record"),
    (lambda d: (d / "metrics.jsonl").write_text("nonsense\n{}\n"), r"metrics.jsonl:1 is not JSON"),
    (lambda d: (d / "config.json").write_text("{{{"), r"config.json is not JSON"),
    (lambda d: __import__("torch").save([1, 2], d / "head0.pth"), r"head0.pth holds a list, not a state dict"),
    (lambda d: (d / "head0.pth").write_bytes(bytes(range(256)) * 4), r"head0.pth is corrupt, truncated"),
])
def test_damaged_run_folders_are_one_line_errors(runs, tmp_path, capsys, damage, match):
    single, _ = runs
    run = _copy_run(single, tmp_path / "run")  # no last.pt: head0.pth is the only source of weights
    damage(run)
    assert report_main([str(run), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and __import__("re").search(match, err[-1]), err


def test_short_run_draws_points_and_fills_every_column(tmp_path, monkeypatch):
    import collab_fast.report as report

    out = tmp_path / "one"
    assert train.main([*BASE, "--pattern", "ilr2", "--max-steps", "1", "--output", str(out)]) == 0
    drawn = []
    real_finish = report._finish
    monkeypatch.setattr(report, "_finish", lambda plt, fig, axes, *a, **k: (
        drawn.extend(line for ax in axes for line in ax.get_lines()), real_finish(plt, fig, axes, *a, **k))[1])
    assert report_main([str(out), "--out", str(tmp_path / "r")]) == 0
    one_point = [line for line in drawn if len(line.get_xdata()) == 1]
    assert one_point and all(line.get_marker() not in (None, "None", "") for line in one_point)
    row = report._summary(load_run(out))
    assert all(v is not None for v in row.values()), row
    assert row["wall_min"] > 0


def test_unwritable_out_is_one_line(runs, tmp_path, capsys, monkeypatch):
    single, _ = runs
    (tmp_path / "file").write_text("x")
    assert report_main([str(single), "--out", str(tmp_path / "file" / "sub")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot write the report" in err[0] and "choose another --out" in err[0], err
    import errno
    import pathlib

    def read_only(self, *a, **k):  # a read-only mount (root ignores permission bits, so simulated)
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(pathlib.Path, "write_text", read_only)
    assert report_main([str(single), "--out", str(tmp_path / "ro")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: cannot write the report (") and "Read-only file system" in err[-1], err
