"""collab_fast.grid_report: a grid's statistics over seeds (paired differences, 95% intervals), its table,
figure and pages."""

import json

import pytest

from collab_fast.grid import plan
from collab_fast.grid_report import summarize, write_outputs


def test_summary_statistics_paired_by_seed():
    cells = plan(["single", "hier4"], [0.0, 0.4], [0, 1, 2], {"beta": ["0.3"]})
    rows = []
    for c, top1 in zip(cells, [90, 92, 94, 80, 82, 84, 93, 95, 97, 85, 85, 85]):
        rows.append({**c, "cell": c.name, "top1": top1, "top1_ensemble": top1, "top1_heads": [top1],
                     "val_loss_head0": 0.1, "step": 1})
    s = {(r["pattern"], r["noise"]): r for r in summarize(rows, "single")}
    assert s["single", 0.0]["err_head0"] == pytest.approx(8.0) and s["single", 0.0]["err_head0_sd"] == pytest.approx(2.0)
    assert s["hier4", 0.0]["diff_vs_baseline"] == pytest.approx(-3.0)  # paired by seed: -3, -3, -3
    assert s["hier4", 0.0]["diff_ci95"] == pytest.approx(0.0)
    assert s["hier4", 0.4]["diff_vs_baseline"] == pytest.approx(-3.0)
    assert s["hier4", 0.4]["diff_ci95"] == pytest.approx(4.303 * 2.0 / 3**0.5, rel=1e-3)  # diffs -5, -3, -1
    assert s["single", 0.0]["diff_vs_baseline"] is None


def test_holdout_cells_are_labelled_holdout_error_not_test_error(tmp_path):
    # read from the cell's resolved config.json, never from the flags' text (an abbreviation such as --hold
    # 100 was mislabelled)
    cells = plan(["single", "hier4"], [0.4], [0, 1], {})
    rows = [{**c, "cell": c.name, "top1": 90.0 + i, "top1_ensemble": 91.0, "top1_heads": [90.0], "val_loss_head0": 0.1,
             "step": 1} for i, c in enumerate(cells)]
    pytest.importorskip("matplotlib", reason="the figure needs matplotlib (the train extra)")
    write_outputs(tmp_path, rows, "single", "cmd", "holdout")
    md = (tmp_path / "grid.md").read_text()
    assert "holdout error head 0 (%)" in md and "held out of the training set" in md and "test error" not in md
    assert json.loads((tmp_path / "grid.json").read_text())["eval_split"] == "holdout"


def test_html_table_and_one_noise_level_drawn_as_bars(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib", reason="the figure needs matplotlib (the train extra)")
    import matplotlib.axes

    cells = plan(["single", "hier4"], [0.4], [0, 1], {})
    rows = [{**c, "cell": c.name, "top1": 90.0 + i, "top1_ensemble": 91.0, "top1_heads": [90.0], "val_loss_head0": 0.1,
             "step": 1} for i, c in enumerate(cells)]
    calls = []
    real_bar = matplotlib.axes.Axes.bar
    monkeypatch.setattr(matplotlib.axes.Axes, "bar", lambda self, *a, **k: calls.append("bar") or real_bar(self, *a, **k))
    write_outputs(tmp_path, rows, "single", "python -m collab_fast.grid <out>", "test")
    assert calls == ["bar"]  # one noise level: bars, not lines through single points
    page = (tmp_path / "grid.html").read_text()
    assert "<table>" in page and "<pre>" not in page and page.count("<tr>") == 3  # header + 2 patterns
    assert "<td>hier4</td>" in page and "&lt;out&gt;" in page
    calls.clear()
    rows2 = [{**r, "noise": 0.0, "cell": r["cell"] + "0"} for r in rows] + rows
    write_outputs(tmp_path, rows2, "single", "cmd", "test")
    assert calls == []  # two noise levels: a line per pattern
