"""The benchmark scripts run end to end (tiny sizes on CPU: a smoke test, not a measurement)."""

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.mark.slow
def test_bench_loss_quick(tmp_path, monkeypatch, capsys):
    import bench_loss
    import common

    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path / "checkout")
    assert bench_loss.main(["--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for provider in ("eager", "compiled", "ours"):
        assert f"provider={provider}" in out
    assert not (tmp_path / "checkout").exists()  # --out, not the checkout
    md = list(tmp_path.glob("bench_loss_cpu_*.md"))
    assert md and "not a performance figure" in md[0].read_text()
    assert list(tmp_path.glob("bench_loss_cpu_*.json"))


def test_bench_loss_rows_carry_size_spread_one_thread_and_l2(monkeypatch):
    # Every timed row: the logits' GiB, the 10th-90th percentile spread around the median, fwd+bwd also with
    # autograd's multithreading off; "in L2" where the bytes moved fit the GPU's L2 (no % of floor there).
    import bench_loss

    rows = bench_loss.run_shape("tiny", 2, 4, 40, bench_loss.torch.float32, ("eager",), bench_loss.torch.device("cpu"),
                                1e10)
    modes = [r["mode"] for r in rows]
    assert modes == ["forward", "fwd+bwd", "fwd+bwd, 1 thread", "backward"], modes
    assert all(r["GiB"] == 2 * 4 * 40 * 4 / 2**30 for r in rows)
    for r in rows[:3]:
        assert r["ms_p10"] <= r["ms"] <= r["ms_p90"], r
    assert all(r["in_L2"] is None for r in rows)  # CPU: no L2 figure
    for l2, fits in ((1, False), (1 << 30, True)):
        monkeypatch.setattr(bench_loss, "l2_bytes", lambda device, l2=l2: l2)
        rows = bench_loss.run_shape("tiny", 2, 4, 40, bench_loss.torch.float32, ("eager",),
                                    bench_loss.torch.device("cpu"), 1e10)
        assert [r["in_L2"] for r in rows if r["mode"] != "backward"] == [fits] * 3


def test_bench_loss_rejects_unknown_provider():
    import bench_loss

    with pytest.raises(SystemExit):
        bench_loss.main(["--quick", "--providers", "fast", "--no-save"])


def test_bench_rescale_quick(tmp_path, monkeypatch, capsys):
    import bench_rescale

    assert bench_rescale.main(["--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "provider=autograd" in out and "provider=ours" in out
    assert list(tmp_path.glob("bench_rescale_cpu_*.json"))


def test_bench_data_quick(tmp_path, monkeypatch, capsys):
    pytest.importorskip("nvidia.dali")
    import bench_data

    assert bench_data.main(["--quick", "--out", str(tmp_path)]) == 0
    assert "img_per_s=" in capsys.readouterr().out
    assert list(tmp_path.glob("bench_data_cpu_*.json"))


@pytest.mark.slow
def test_bench_train_quick(tmp_path, monkeypatch, capsys):
    import bench_train

    assert bench_train.main(["--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "pattern=plain" in out and "pattern=single" in out and "pattern=hier4" in out and "time_vs_single=" in out
    md = next(tmp_path.glob("bench_train_cpu_*.md")).read_text()
    assert "paper_time" in md


def test_cpu_smoke_runs_are_not_saved_in_the_checkout_by_default(tmp_path, monkeypatch, capsys):
    import bench_rescale
    import common

    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path / "results")
    assert bench_rescale.main(["--quick"]) == 0
    assert "not saved (pass --out DIR" in capsys.readouterr().out
    assert not (tmp_path / "results").exists()


def test_percent_of_floor_is_never_above_100():
    import common

    assert common.pct_of_floor(1e9, 1e12, 2.0) == pytest.approx(50.0)
    assert common.pct_of_floor(1e9, 1e12, 0.5) is None  # faster than DRAM: served from a cache
    assert common.pct_of_floor(None, 1e12, 1.0) is None
    # never: times from 100x faster to 100x slower than the floor (1 ms here), the floor itself and its neighbours
    times = [10 ** (k / 50) for k in range(-100, 101)] + [1.0, 1.0 - 1e-12, 1.0 + 1e-12, 0.0, -1.0]
    got = [common.pct_of_floor(1e9, 1e12, ms) for ms in times]
    assert all(p is None or 0 < p <= 100 for p in got)
    assert sum(p is None for p in got) >= 100 and common.pct_of_floor(1e9, 1e12, 1.0) == pytest.approx(100.0)


@pytest.mark.slow
def test_gpu_check_dry_run_and_no_cuda(tmp_path):
    # The GPU validation's rehearsal on CPU: every stage runs at tiny sizes, the budget is kept, at most 8
    # files come back (the device tool's limit); the real run on a machine without CUDA stops at once with one line.
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=sys.executable, GPU_CHECK_WORK=str(tmp_path / "work"),
               GPU_CHECK_BUDGET="500")
    res = subprocess.run(["bash", str(root / "scripts" / "gpu_check.sh"), "--dry-run"], env=env, capture_output=True,
                         text=True, timeout=700)
    log = (tmp_path / "out" / "check.log").read_text()
    assert res.returncode == 0, log[-3000:] + res.stderr[-2000:]
    assert "0 stage(s) not ok" in log
    for name in ("env", "loss-tests", "linear-tests", "build", "ops-tests", "train", "train-graph", "bench-loss",
                 "bench-train", "host-profile", "bench-linear", "bench-rescale"):
        assert f"{name}: ok" in log, name
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert len(files) <= 8 and {"check.log", "tests.log", "tests2.log", "run.log"} <= set(files), files
    assert sum(f.endswith(".json") for f in files) == 4
    assert "train loss" in log and "(falls)" in log
    # the captured path ran: the trainer's step and the benchmark's captured rows (the op tape on CPU)
    assert "train-graph (--cuda-graphs): train loss" in log
    run_log = (tmp_path / "out" / "run.log").read_text()
    assert "captured in an op tape" in run_log and "pattern=plain  mode=graph" in run_log
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["OUT"] = str(tmp_path / "out2")
    res = subprocess.run(["bash", str(root / "scripts" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2 and "no CUDA device" in res.stdout


def test_bench_fused_linear_quick_measures_memory(tmp_path):
    import bench_fused_linear

    assert bench_fused_linear.main(["--quick", "--out", str(tmp_path)]) == 0
    rows = json.loads(next(tmp_path.glob("bench_fused_linear_cpu_*.json")).read_text())["rows"]
    by = {r["provider"]: r for r in rows}
    assert set(by) == {"fused linear (chunked)", "logits + fused_collab_loss", "naive PyTorch"}
    assert all(r["peak_extra_mb"] > 0 and r["ms"] > 0 for r in rows)
    # the materialised reference keeps about 11 logit-sized tensors; the chunked one a fraction of that
    assert by["fused linear (chunked)"]["x_logits"] < by["logits + fused_collab_loss"]["x_logits"] / 2


@pytest.mark.slow
def test_sass_loss_writes_its_tables_and_refuses_a_bad_shape(tmp_path):
    # compiled for sm_90 in a fresh interpreter (this one runs Triton's interpreter): no GPU needed
    import subprocess

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "sass_loss.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = lambda *a: subprocess.run([sys.executable, str(script), *a], env=env, capture_output=True, text=True,
                                    timeout=600)
    res = run("--shapes", "H2:8192:bf16", "H4:1000:fp32", "--out", str(tmp_path))
    if res.returncode == 2 and "ships no cuobjdump" in res.stderr:
        pytest.skip(res.stderr.strip())
    assert res.returncode == 0, res.stderr[-2000:]
    md = list(tmp_path.glob("sass_loss_sm90_triton*.md"))
    assert md and "| H2 C8192 bf16 | forward | 2048 / 512 |" in md[0].read_text()
    rows = json.loads(next(tmp_path.glob("sass_loss_sm90_triton*.json")).read_text())
    assert [r["phase"] for r in rows] == ["forward", "backward"] * 2
    assert all(0 < r["finite"]["per_element"] < 30 and r["exp_loops"] >= 2 for r in rows[:2])  # two blocks a row
    assert rows[2]["finite"] is None and rows[2]["fwd_bwd_issue_bound_ms"] > 0  # one block: no column loop
    bad = run("--shapes", "H2:C4096", "--json", "-")
    assert bad.returncode == 2 and "--shapes: 'H2:C4096' is not H:C:DTYPE" in bad.stderr


@pytest.mark.slow
def test_host_loss_counts_and_times_a_call_with_the_driver_stubbed(tmp_path):
    # Triton's real launcher against a stand-in libcuda, in a fresh interpreter: no GPU needed
    import shutil
    import subprocess

    if shutil.which("cc") is None:
        pytest.skip("needs a C compiler (cc) for the stand-in libcuda and Triton's launcher")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "host_loss.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "triton"), TMPDIR=str(tmp_path))
    run = lambda *a: subprocess.run([sys.executable, str(script), *a], env=env, capture_output=True, text=True,
                                    timeout=600)
    res = run("--shape", "3,16,100", "--rounds", "2", "--calls", "3", "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr[-2000:]
    md = next(tmp_path.glob("host_loss_cpu-stub-driver_H3N16C100fp32_triton*.md")).read_text()
    assert "| ours-api |" in md and "CPU with the CUDA driver stubbed" in md
    rows = {r["provider"]: r for r in json.loads(next(tmp_path.glob("host_loss_*.json")).read_text())["rows"]}
    api = rows["ours-api"]
    # one fwd+bwd: two Triton launches; the one other kernel is autograd's seed for .backward(); no sync
    assert api["triton_launches"] == 2 and api["aten_kernels"] == 1 and api["host_syncs"] == 0, api
    assert api["ops"].get("ones_like") == 1 and api["allocations"] <= 4, api
    assert rows["launch-fwd"]["triton_launches"] == 1 and all(r["us"] > 0 for r in rows.values())
    bad = run("--shape", "3,16", "--json", "-")
    assert bad.returncode == 2 and "--shape: '3,16' is not three positive integers" in bad.stderr
