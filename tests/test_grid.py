"""The comparison grid on CPU: a tiny grid runs, tabulates, draws, skips finished cells and continues an
interrupted grid."""

import json
import os
import subprocess
import sys
import time

import pytest
from conftest import CPU_ARCH

from collab_fast.grid import Cell, eval_split, main, plan

BASE = ["--", "digits", "--device", "cpu", "--arch", CPU_ARCH, "-b", "64", "--image-size", "16", "--max-steps", "2",
        "--log-every", "1"]


def test_plan_names_and_flags():
    cells = plan(["single", "hier4"], [0.0, 0.4], [0, 1, 2], {"beta": ["0.3"]})
    assert len(cells) == 12 and cells[0].name == "single_noise0_beta-0.3_seed0"
    assert cells[0].flags()[:6] == ["--pattern", "single", "--label-noise", "0", "--seed", "0"]
    assert eval_split({"holdout": 300}) == "holdout" and eval_split({"holdout": 0}) == "test"


@pytest.mark.slow
def test_tiny_grid_runs_tabulates_draws_and_skips_finished_cells(tmp_path, capsys):
    out = tmp_path / "grid"
    args = [str(out), "--patterns", "single,ilr2", "--seeds", "0,1", "--noise", "0.2", *BASE]
    assert main(args) == 0
    md = (out / "grid.md").read_text()
    assert "| single | 0.2 | 2 |" in md and "| ilr2 | 0.2 | 2 |" in md and "+-" in md
    data = json.loads((out / "grid.json").read_text())
    assert len(data["cells"]) == 4 and {c["pattern"] for c in data["cells"]} == {"single", "ilr2"}
    assert (out / "fig3.png").stat().st_size > 5000 and "fig3.png" in (out / "grid.html").read_text()
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("cells/*/result.json")}
    capsys.readouterr()
    assert main(args) == 0
    assert capsys.readouterr().out.count("finished earlier, skipped") == 4
    assert {p: p.stat().st_mtime_ns for p in out.glob("cells/*/result.json")} == stamps


@pytest.mark.slow
def test_interrupted_grid_continues(tmp_path):
    out = tmp_path / "grid"
    args = [str(out), "--patterns", "single", "--seeds", "0,1,2", *BASE]
    proc = subprocess.Popen([sys.executable, "-m", "collab_fast.grid", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not list(out.glob("cells/*/result.json")):
        time.sleep(0.1)
    proc.kill()  # the grid dies (SIGKILL); its running cell gets SIGTERM, writes last.pt and stops
    proc.wait()
    first = {p: p.stat().st_mtime_ns for p in out.glob("cells/*/result.json")}
    assert 1 <= len(first) < 3
    for _ in range(20):  # the cell may take a moment to stop and release its run folder
        if main(args) == 0:
            break
        time.sleep(1)
    assert len(list(out.glob("cells/*/result.json"))) == 3
    assert all(p.stat().st_mtime_ns == t for p, t in first.items())  # finished cells were not rerun


def test_bad_grid_arguments(tmp_path, capsys):
    assert main([str(tmp_path / "g"), "--noise", "a,b", *BASE]) == 2
    assert "--noise: expected comma-separated numbers" in capsys.readouterr().err
    assert main([str(tmp_path / "g"), *BASE, "--seed", "3"]) == 2
    assert "--seed is set by the grid" in capsys.readouterr().err
    assert main([str(tmp_path / "g"), "--patterns", "hier5", *BASE]) == 2
    assert "unknown pattern" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(tmp_path / "g")])
    assert Cell(pattern="tree:2x2", noise=0.5, seed=1).name == "tree2x2_noise0.5_seed1"


@pytest.mark.parametrize("flags, match", [
    (["--patterns", ","], "--patterns: no values"),
    (["--noise", ""], "--noise: no values"),
    (["--seeds", ","], "--seeds: no values"),
    (["--seeds", "inf"], "--seeds: expected comma-separated integers, got 'inf'"),
    (["--seeds", "1.5"], "--seeds: expected comma-separated integers"),
    (["--noise", "nan"], "--noise: expected finite numbers"),
    (["--axis", "beta="], "--axis 'beta=': no values"),
    (["--axis", "beta=0.3", "--axis", "beta=0.5"], "--axis beta given twice"),
    (["--axis", "label-noise=0.2,0.4"], "--axis label-noise: that is the grid's own dimension; give its values with "
                                        "--noise"),
    (["--axis", "noise=0.2"], "with --noise"),
    (["--axis", "seed=1,2"], "with --seeds"),
    (["--axis=--pattern=ilr2"], "with --patterns"),
    (["--axis", "output=a,b"], "set by the grid for each cell"),
])
def test_bad_grid_values_and_axes_are_one_line(tmp_path, capsys, flags, match):
    assert main([str(tmp_path / "g"), *flags, *BASE]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and match in err and "\n" not in err, err
    assert not (tmp_path / "g").exists()


def test_jobs_never_exceed_the_cells(monkeypatch):
    # --jobs 2**31 built 2**31 environments (18.8 GB, OOM-killed): the slots are capped by the cells
    from collab_fast.grid import _jobs_and_envs

    assert len(_jobs_and_envs(2**31, 6)) == 6
    assert len(_jobs_and_envs(10**8, 1)) == 1
    assert len(_jobs_and_envs(None, 6)) == 1


@pytest.mark.slow
def test_editing_a_file_the_command_names_reruns_its_cells(tmp_path, capsys):
    # A cell is its command on the contents of the files the command names: an edited --config reruns it.
    out, conf = tmp_path / "grid", tmp_path / "t.json"
    conf.write_text(json.dumps({"max_steps": 1}))
    args = [str(out), "--patterns", "single", "--seeds", "0", *BASE[:-4], "--log-every", "1", "--config", str(conf)]
    assert main(args) == 0
    res = next(out.glob("cells/*/result.json"))
    assert json.loads(res.read_text())["step"] == 1
    capsys.readouterr()
    assert main(args) == 0 and "finished earlier, skipped" in capsys.readouterr().out  # unchanged: reused
    conf.write_text(json.dumps({"max_steps": 2}))
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "finished earlier" not in text and "used another command" in text, text
    assert json.loads(res.read_text())["step"] == 2


def test_cell_names_stay_inside_cells_and_distinct():
    from collab_fast.grid import Cell

    names = set()
    for v in ["../../etc", "a/b", "..", ".hidden", "x y", "a\\\\b", "ok-1.5"]:
        name = Cell(pattern="ilr2", noise=0.0, **{"soft-loss": v}, seed=0).name
        assert "/" not in name and "\\\\" not in name and ".." not in name and not name.startswith(".")
        names.add(name)
    assert len(names) == 7
    assert Cell(pattern="tree:2x2", noise=0.2, seed=1).name == "tree2x2_noise0.2_seed1"  # plain names unchanged


@pytest.mark.slow
def test_a_cell_is_done_only_under_its_recorded_command(tmp_path, capsys):
    out = tmp_path / "grid"
    args = [str(out), "--patterns", "single", "--seeds", "0", *BASE]
    assert main(args) == 0
    res = next(out.glob("cells/*/result.json"))
    assert json.loads(res.read_text())["step"] == 2
    more = [str(out), "--patterns", "single", "--seeds", "0", *BASE[:-4], "--max-steps", "3", "--log-every", "1"]
    assert main(more) == 0  # another command: rerun from scratch, the old run moved aside
    text = capsys.readouterr().out
    assert "finished earlier" not in text and "used another command" in text
    assert json.loads(res.read_text())["step"] == 3
    res.write_text("{not json")  # damaged: rerun, not a traceback
    assert main(more) == 0
    assert json.loads(res.read_text())["step"] == 3
    row = json.loads(res.read_text())
    row["cell"] = "another_cell"
    res.write_text(json.dumps(row))  # a result copied from another cell is not this cell's
    assert main(more) == 0
    assert json.loads(res.read_text())["cell"] != "another_cell"


@pytest.mark.slow
def test_sigint_cancels_pending_cells_and_stops_the_running_one(tmp_path):
    import signal

    out = tmp_path / "grid"
    args = [str(out), "--patterns", "single", "--seeds", "0,1,2", "--jobs", "1", *BASE[:-4], "--max-steps", "5000",
            "--log-every", "1"]
    proc = subprocess.Popen([sys.executable, "-m", "collab_fast.grid", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not list(out.glob("cells/*/run/metrics.jsonl")):
        time.sleep(0.2)
    time.sleep(2)
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the grid ignored SIGINT")
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err
    started, finished = list(out.glob("cells/*/command.txt")), list(out.glob("cells/*/result.json"))
    assert len(started) == len(finished) + 1 < 3  # the running cell stopped, no further cell was started
    running = [p.parent for p in started if not (p.parent / "result.json").exists()]
    assert (running[0] / "run" / "last.pt").is_file()  # the running trainer checkpointed


@pytest.mark.slow
def test_a_signal_while_a_cell_starts_is_not_lost(tmp_path, monkeypatch):
    # The grid's handler stops the cells it knows of; a cell whose trainer was being started when the signal
    # landed must be stopped too, not run to its end.
    import signal
    import subprocess as sp
    import threading

    from collab_fast import grid

    real = sp.Popen

    def popen_then_signal(*args, **kw):
        proc = real(*args, **kw)
        grid._on_signal(signal.SIGINT, None)  # lands after the spawn, before the grid registers the process
        return proc

    monkeypatch.setattr(grid.subprocess, "Popen", popen_then_signal)
    grid._cancel.clear()
    base = ["digits", "--device", "cpu", "--arch", CPU_ARCH, "-b", "64", "--image-size", "16", "--epochs", "1000"]
    cell = Cell(pattern="single", noise=0.0, seed=0)
    result = {}

    def go():
        try:
            grid.run_cell(cell, tmp_path, base, dict(os.environ), threading.Lock())
        except grid.Cancelled:
            result["cancelled"] = True

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(120)
    if t.is_alive():
        for p in list(grid._running):
            p.kill()
        pytest.fail("the cell ran on after the signal")
    grid._cancel.clear()
    assert result == {"cancelled": True}
