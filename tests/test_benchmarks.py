"""The benchmark scripts run end to end (tiny sizes on CPU: a smoke test, not a measurement)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.mark.slow
def test_bench_loss_quick(tmp_path, monkeypatch, capsys):
    import bench_loss
    import common

    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    assert bench_loss.main(["--quick"]) == 0
    out = capsys.readouterr().out
    for provider in ("eager", "compiled", "ours"):
        assert f"provider={provider}" in out
    md = list(tmp_path.glob("bench_loss_cpu_*.md"))
    assert md and "not a performance figure" in md[0].read_text()
    assert list(tmp_path.glob("bench_loss_cpu_*.json"))


def test_bench_loss_rejects_unknown_provider():
    import bench_loss

    with pytest.raises(SystemExit):
        bench_loss.main(["--quick", "--providers", "fast", "--no-save"])


def test_bench_rescale_quick(tmp_path, monkeypatch, capsys):
    import bench_rescale
    import common

    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    assert bench_rescale.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "provider=autograd" in out and "provider=ours" in out
    assert list(tmp_path.glob("bench_rescale_cpu_*.json"))


def test_bench_data_quick(tmp_path, monkeypatch, capsys):
    pytest.importorskip("nvidia.dali")
    import bench_data
    import common

    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    assert bench_data.main(["--quick"]) == 0
    assert "img_per_s=" in capsys.readouterr().out
    assert list(tmp_path.glob("bench_data_cpu_*.json"))


@pytest.mark.slow
def test_bench_train_quick(tmp_path, monkeypatch, capsys):
    import bench_train
    import common

    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    assert bench_train.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "pattern=single" in out and "pattern=hier4" in out and "time_vs_single=" in out
    md = next(tmp_path.glob("bench_train_cpu_*.md")).read_text()
    assert "paper_time" in md
