"""The trainer end to end on CPU: every pattern, outputs, resume, signals, DDP, eval-only, faults, bad flags."""

import json
import math
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import CPU_ARCH, CPU_DIGITS

from collab_fast import optim, train
from collab_fast.checkpoint import load_checkpoint
from collab_fast.data import write_toy
from collab_fast.models import build, build_model, builder
from collab_fast.models.builder import initial_weights
from collab_fast.run_state import agree_on_resume

BASE = [*CPU_DIGITS, "-b", "32", "--log-every", "1"]


def run_train(tmp_path, *extra, name="run"):
    out = tmp_path / name
    code = train.main([*BASE, "--output", str(out), *extra])
    assert code == 0
    return out


def records(out, kind):
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


@pytest.mark.parametrize("pattern", ["single", "inst2", "ilr2", "hier4", "tree:4"])
def test_every_pattern_end_to_end(tmp_path, pattern):
    out = run_train(tmp_path, "--pattern", pattern, "--max-steps", "2")
    heads = {"single": 1, "inst2": 2, "ilr2": 2, "hier4": 4, "tree:4": 4}[pattern]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["pattern"] == pattern and cfg["lr"] == pytest.approx(0.1 * 32 / 256) and cfg["amp"] == "off"
    assert cfg["augment"] == "crop"  # resolved and recorded: digits are not flipped
    tr, ev = records(out, "train"), records(out, "eval")
    assert [r["step"] for r in tr] == [1, 2]
    for key in ("loss", "hard", "soft", "train_acc", "img_per_s", "peak_rss_mb", "lr", "epoch"):
        assert key in tr[0]
    assert len(tr[0]["hard"]) == heads and tr[0]["img_per_s"] > 0
    assert len(ev) == 1 and len(ev[0]["top1_heads"]) == heads and ev[0]["val_samples"] == 360
    assert ev[0]["epoch"] == 1  # stopped by --max-steps inside epoch 1
    for key in ("top1", "top5", "top1_ensemble", "val_loss"):
        assert key in ev[0]
    for f in ("last.pt", "best.pt", "head0.pth", "config.json"):
        assert (out / f).is_file()
    assert list((out / "tb").iterdir())  # TensorBoard event file
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["state"]["step"] == 2 and set(ckpt) >= {"model", "optimizer", "scaler", "config", "state", "rng"}
    build(CPU_ARCH, "single").load_state_dict(torch.load(out / "head0.pth", weights_only=True), strict=True)


def test_resume_of_a_finished_run_says_so_and_prints_the_summary(tmp_path, capsys):
    out = run_train(tmp_path, "--pattern", "ilr2", "--max-steps", "2")
    capsys.readouterr()
    assert train.main([*BASE, "--pattern", "ilr2", "--max-steps", "2", "--output", str(out), "--resume", "auto"]) == 0
    text = capsys.readouterr().out
    assert "is already complete (2 of 2 steps); nothing to train" in text
    assert "done at step 2: top-1 per head [" in text and "head 0 exported to" in text


def test_kl_soft_loss_with_free_weights(tmp_path):
    out = run_train(tmp_path, "--pattern", "ilr2", "--max-steps", "2", "--soft-loss", "kl", "--loss-weights", "1,4")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["soft_loss"] == "kl" and cfg["loss_weights"] == [1.0, 4.0] and cfg["beta"] is None
    params = train.TrainConfig.from_flags(**cfg).loss  # config.json gives the run's settings back
    assert params.soft_loss == "kl" and (params.hard_coef, params.soft_coef) == (1.0, 4.0)


def test_soft_ramp_holdout_and_reduced_training_set(tmp_path):
    cfg = train.TrainConfig.from_flags("digits", soft_ramp=2.0)
    f = [optim.soft_factor(cfg.optim, s, 10) for s in (0, 5, 10, 15, 19, 20, 100)]
    assert f[0] == pytest.approx(math.exp(-5)) and f[2] == pytest.approx(math.exp(-5 / 4))
    assert f == sorted(f) and f[4] < 1.0 and f[5] == f[6] == 1.0
    assert optim.soft_factor(train.TrainConfig.from_flags("digits").optim, 0, 10) == 1.0  # no ramp: full weight
    out = run_train(tmp_path, "--pattern", "ilr2", "--epochs", "2", "--train-samples", "96", "--holdout", "50",
                    "--soft-ramp", "1", "--log-every", "1")
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["soft_ramp"], cfg["train_samples"], cfg["holdout"]) == (1.0, 96, 50)
    tr, ev = records(out, "train"), records(out, "eval")
    assert len(tr) == 6 and [r["val_samples"] for r in ev] == [50, 50]  # 96 // 32 steps per epoch; the holdout
    # the logged soft objective is unscaled; the total carries the ramp: hard_coef * hard + factor * soft_coef * soft
    p = train.TrainConfig.from_flags(**cfg).loss
    for r in tr:
        factor = optim.soft_factor(train.TrainConfig.from_flags(**cfg).optim, r["step"] - 1, 3)
        want = p.hard_coef * sum(r["hard"]) + factor * p.soft_coef * sum(r["soft"])
        assert r["loss"] == pytest.approx(want, rel=1e-4), r["step"]
    assert train.main([*BASE, "--output", str(tmp_path / "x"), "--holdout", "1437"]) == 2


@pytest.mark.slow
def test_toy_folder_through_dali(tmp_path):
    pytest.importorskip("nvidia.dali")
    data = write_toy(tmp_path / "toy", classes=3, per_class=8, size=48, val_per_class=2)
    out = tmp_path / "run"
    assert train.main(["toy", "--device", "cpu", "--data", str(data), "--arch", "resnet18",
                       "--pattern", "hier4", "--image-size", "32",
                       "-b", "8", "--max-steps", "3", "--output", str(out), "--log-every", "1"]) == 0
    assert [r["step"] for r in records(out, "train")] == [1, 2, 3]
    assert records(out, "eval")[0]["val_samples"] == 6


@pytest.mark.slow
def test_default_toy_set_is_generated_on_first_use(tmp_path, monkeypatch):
    # What the Quick start runs: toy without --data, in a fresh cache. The resolved config names the default
    # folder before it exists; it must be generated, not refused as a missing --data.
    import collab_fast.data as data

    monkeypatch.setenv("COLLAB_FAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "TOY_DEFAULT", {"classes": 3, "per_class": 8, "size": 48})
    out = tmp_path / "run"
    assert train.main(["toy", "--device", "cpu", "--arch", "resnet18", "--pattern", "ilr2", "--image-size", "32",
                       "-b", "8", "--max-steps", "1", "--output", str(out), "--loader", "torch"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["data"] == str(data.default_toy_dir()) and (data.default_toy_dir() / ".complete").exists()


@pytest.mark.slow
def test_dali_resume_is_exact_mid_epoch_and_across_epochs(tmp_path):
    # Image folders go through DALI, whose reader position and random state travel in the checkpoint:
    # 24 images at batch 4 = 6 steps per epoch; 8 steps (epoch 2, batch 2) + resume to 14 equals 14 uninterrupted
    # steps (a fresh reader would replay epoch 1's order and random state).
    pytest.importorskip("nvidia.dali")
    data = write_toy(tmp_path / "toy", classes=3, per_class=8, size=40, val_per_class=1)
    common = ["toy", "--device", "cpu", "--data", str(data), "--arch", "resnet18",
              "--pattern", "ilr2", "--image-size", "32", "-b", "4",
              "--log-every", "1", "--threads", "1", "--epochs", "3"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert train.main([*common, "--max-steps", "14", "--output", str(full)]) == 0
    assert train.main([*common, "--max-steps", "8", "--output", str(part)]) == 0
    assert load_checkpoint(part / "last.pt")["state"]["loader_state"]  # the reader's position was saved
    assert train.main([*common, "--max-steps", "14", "--output", str(part), "--resume", "auto"]) == 0
    assert [r["loss"] for r in records(full, "train")] == [r["loss"] for r in records(part, "train")]
    a, b = _params(full / "last.pt"), _params(part / "last.pt")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _params(path):
    return load_checkpoint(path)["model"]


@pytest.mark.slow
def test_resume_equivalence_across_an_epoch_boundary(tmp_path):
    # 1437 digits at batch 128: 11 steps per epoch. Uninterrupted 13 steps vs 5 steps + resume to 13.
    common = ["--pattern", "ilr2", "-b", "128", "--lr", "0.2", "--label-noise", "0.2", "--warmup-epochs", "0.5"]
    full = run_train(tmp_path, *common, "--max-steps", "13", name="full")
    part = run_train(tmp_path, *common, "--max-steps", "5", name="part")
    assert load_checkpoint(part / "last.pt")["state"]["batch_in_epoch"] == 5
    assert train.main([*BASE, "--output", str(part), *common, "--max-steps", "13", "--resume", "auto"]) == 0
    a, b = _params(full / "last.pt"), _params(part / "last.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la = [r["loss"] for r in records(full, "train")]
    lb = [r["loss"] for r in records(part, "train")]
    assert la == lb  # the same 13 steps, step by step


@pytest.mark.slow
def test_sigterm_writes_checkpoint_then_resume(tmp_path):
    out = tmp_path / "sig"
    cmd = [sys.executable, "-m", "collab_fast.train", *BASE, "--pattern", "ilr2", "--epochs", "50", "--output", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if (out / "metrics.jsonl").exists() and len(records(out, "train")) >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "received SIGTERM" in err and "--resume auto" in err
    step = load_checkpoint(out / "last.pt")["state"]["step"]
    assert step >= 2
    assert train.main([*BASE, "--pattern", "ilr2", "--epochs", "50", "--output", str(out), "--resume", "auto",
                       "--max-steps", str(step + 2)]) == 0
    assert load_checkpoint(out / "last.pt")["state"]["step"] == step + 2
    assert records(out, "train")[-1]["step"] == step + 2


@pytest.mark.slow
def test_sigkill_at_random_moments_always_resumes_from_a_good_checkpoint(tmp_path):
    """Fault injection: SIGKILL at random moments and inside checkpoint writes (as soon as a temp file
    appears); every time, last.pt loads, passes its checksum and holds finite weights, and --resume auto
    finishes the run."""
    out = tmp_path / "kill"
    argv = [*BASE, "--pattern", "ilr2", "-b", "64", "--image-size", "16", "--epochs", "8", "--save-every", "3",
            "--progress", "off", "--output", str(out), "--resume", "auto"]
    rng = random.Random(1)
    steps, in_write = [], 0
    for i in range(6):
        proc = subprocess.Popen([sys.executable, "-m", "collab_fast.train", *argv], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        start, deadline = time.time(), time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if i == 0 and (out / "last.pt").exists():  # a first checkpoint, then a random moment after it
                time.sleep(rng.uniform(0.0, 1.0))
                break
            if i % 2 == 1 and time.time() - start > rng.uniform(3.0, 10.0):
                break
            if i % 2 == 0 and i and list(out.glob(".*.pt.*.tmp")):  # inside a checkpoint write
                in_write += 1
                break
            time.sleep(0.002)
        assert proc.poll() is None, "the run ended before it was killed"
        proc.kill()
        proc.wait()
        if (out / "last.pt").exists():
            ckpt = load_checkpoint(out / "last.pt")  # verifies the checksum
            assert all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())
            steps.append(ckpt["state"]["step"])
    assert in_write >= 2 and steps == sorted(steps) and steps[-1] > 0
    assert train.main(argv) == 0
    assert load_checkpoint(out / "last.pt")["state"]["step"] == 8 * (1437 // 64)


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process_same_global_batch(tmp_path):
    common = ["--pattern", "hier4", "--max-steps", "3", "--lr", "0.1"]
    single = run_train(tmp_path, *common, "-b", "32", "--accum-steps", "2", name="single")
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--standalone", "-m", "collab_fast.train", *BASE, *common, "-b", "16",
                          "--output", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    ls, ld = records(single, "train"), records(out, "train")
    assert [r["samples"] for r in ld] == [32, 32, 32]  # metrics all-reduced over both ranks
    for a, b in zip(ls, ld):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
    pa, pb = _params(single / "last.pt"), _params(out / "last.pt")
    for k in pa:
        if "running" in k or "num_batches" in k:
            continue  # DDP broadcasts rank 0's batch-norm buffers; accumulation updates them twice
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-4, atol=1e-6, msg=k)


def test_eval_only_from_exported_head(tmp_path, capsys):
    out = run_train(tmp_path, "--pattern", "hier4", "--max-steps", "2")
    final = records(out, "eval")[-1]
    ev = tmp_path / "eval"
    assert train.main([*BASE, "--pattern", "single", "--eval-only", "--weights", str(out / "head0.pth"),
                       "--output", str(ev)]) == 0
    got = json.loads((ev / "eval.json").read_text())["eval"]
    assert got["top1"] == pytest.approx(final["top1_heads"][0])
    assert got["top5"] == pytest.approx(final["top5_heads"][0])
    assert not (ev / "last.pt").exists()


def test_non_finite_loss_stops_naming_the_step(tmp_path):
    good = run_train(tmp_path, "--pattern", "ilr2", "--max-steps", "1", name="nan")
    before = (good / "last.pt").read_bytes()
    with pytest.raises(SystemExit, match=r"non-finite loss at step \d+"):
        train.main([*BASE, "--pattern", "ilr2", "--lr", "1e30", "--output", str(good), "--resume", "auto",
                    "--max-steps", "12", "--log-every", "10"])
    assert (good / "last.pt").read_bytes() == before  # the last good checkpoint is kept


def _poison_step(monkeypatch, at: int) -> None:
    """Optimizer step number `at` (1-based) gets NaN images."""
    real, calls = train.Step.__call__, {"n": 0}

    def poisoned(self, x, y, meter=None):
        calls["n"] += 1
        return real(self, x * float("nan") if calls["n"] == at else x, y, meter)

    monkeypatch.setattr(train.Step, "__call__", poisoned)


def test_skip_nonfinite_counts_and_continues(tmp_path, monkeypatch):
    # One poisoned batch (NaN images): its step is skipped, the model is left exactly as it was (batch-norm
    # statistics included, which the forward pass had already overwritten with NaN), training goes on.
    _poison_step(monkeypatch, 2)
    out = run_train(tmp_path, "--pattern", "ilr2", "--max-steps", "6", "--skip-nonfinite", "--log-every", "3")
    tr, ev = records(out, "train"), records(out, "eval")
    assert tr[-1]["step"] == 6 and tr[-1]["skipped_steps"] == 1
    assert all(map(torch.isfinite, [torch.tensor(ev[-1]["val_loss"]), torch.tensor(ev[-1]["val_loss_head0"])]))
    head = torch.load(out / "head0.pth", weights_only=True)
    assert all(torch.isfinite(t).all() for t in head.values() if t.is_floating_point())


def test_diverged_model_is_never_kept_as_good(tmp_path):
    # --lr 1e30: the first update breaks the weights; later steps are skipped, but the model is broken.
    # The run must stop with an error and write neither best.pt nor head0.pth from it.
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="diverged"):
        train.main([*BASE, "--pattern", "ilr2", "--lr", "1e30", "--max-steps", "6", "--skip-nonfinite",
                    "--output", str(out)])
    assert not (out / "best.pt").exists() and not (out / "head0.pth").exists()


@pytest.mark.parametrize("argv, match", [(["--lr", "nan"], "--lr"), (["--warmup-epochs", "-5"], "--warmup-epochs"),
                                         (["--seed", "-1"], "--seed"), (["--lr", "inf"], "--lr")])
def test_bad_numbers_are_usage_errors(argv, match, capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_config([*BASE, *argv])
    assert e.value.code == 2 and match in capsys.readouterr().err


def test_batch_larger_than_the_training_set(tmp_path, capsys):
    assert train.main([*BASE, "-b", "5000", "--output", str(tmp_path / "big")]) == 2
    assert "--batch-size 5000 is larger than the training set" in capsys.readouterr().err


def test_out_of_memory_message(tmp_path, monkeypatch):
    real_build = builder.build_model

    def oom_build(*a, **k):
        model = real_build(*a, **k)

        def boom(*_a, **_k):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

        model.forward = boom
        return model

    monkeypatch.setattr(builder, "build_model", oom_build)
    with pytest.raises(SystemExit, match=r"out of memory at batch size 32 .* try --batch-size 16"):
        train.main([*BASE, "--pattern", "ilr2", "--max-steps", "1", "--output", str(tmp_path / "oom")])


@pytest.mark.parametrize("argv, match", [
    (["digits", "--arch", "vgg16"], r"--arch must be one of resnet18, .*or timm:NAME / torchvision:NAME, got 'vgg16'"),
    (["digits", "--beta", "2"], r"--beta must be in \[0, 1\]"),
    (["digits", "--temperature", "0"], r"--temperature must be in \(0, 10000\]"),
    (["digits", "--pattern", "hier5"], "unknown pattern 'hier5'"),
    (["imagenet"], "imagenet needs --data DIR"),
    (["digits", "--data", "/no/such/dir"], "--data /no/such/dir: no such directory"),
    (["digits", "--weights", "/no/such.pth"], "--weights /no/such.pth: no such file"),
    (["digits", "--eval-only"], "--eval-only needs --weights PATH or --resume"),
    (["digits", "-b", "30", "--accum-steps", "4"], "must be a multiple of --accum-steps"),
    (["digits", "--amp", "fp16", "--skip-nonfinite"], "--skip-nonfinite cannot be combined"),
    (["digits", "-b", "0"], r"--batch-size must be in \[1, 1048576\]"),
    (["svhn"], "invalid choice: 'svhn'"),
    (["digits", "--loss-weights", "1"], r"--loss-weights must be a pair \(hard, soft\) of numbers >= 0, got \[1.0\]"),
    (["digits", "--loss-weights", "1,4", "--beta", "0.3"], "--loss-weights replaces --beta and --soft-weight"),
    (["digits", "--loss-weights", "1,-4"], r"--loss-weights must be in \[0, inf\)"),
    (["digits", "--soft-loss", "js"], "invalid choice: 'js'"),
    (["digits", "--soft-ramp", "-1"], r"--soft-ramp must be in \[0, inf\)"),
    (["digits", "--train-samples", "0"], r"--train-samples must be in \[1, 2147483647\]"),
])
def test_bad_flags(argv, match, capsys):
    with pytest.raises(SystemExit) as exc:
        train.parse_config(argv)
    assert exc.value.code == 2
    assert __import__("re").search(match, capsys.readouterr().err)


def test_bad_checkpoints(tmp_path, capsys):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00" * 100)
    assert train.main([*BASE, "--resume", str(corrupt), "--output", str(tmp_path / "a")]) == 2
    assert "corrupt, truncated" in capsys.readouterr().err
    out = run_train(tmp_path, "--pattern", "ilr2", "--max-steps", "1")
    assert train.main([*BASE, "--pattern", "hier4", "--resume", str(out / "last.pt"), "--output", str(tmp_path / "b")]) == 2
    assert f"is a {CPU_ARCH} ilr2 run, not {CPU_ARCH} hier4" in capsys.readouterr().err
    # an exported head starts every copy of a collaborative pattern (the classifier re-initialised per head);
    # one of another network is one line
    assert train.main([*BASE, "--pattern", "ilr2", "--weights", str(out / "head0.pth"), "--output", str(tmp_path / "c"),
                       "--max-steps", "1"]) == 0
    assert train.main([*BASE, "--arch", "resnet110", "--pattern", "ilr2", "--weights", str(out / "head0.pth"),
                       "--output", str(tmp_path / "d"), "--max-steps", "1"]) == 2
    assert "the weights do not fit" in capsys.readouterr().err.strip().splitlines()[-1]


def test_weights_start_every_copy_and_the_heads_differ(tmp_path):
    from collab_fast.checkpoint import load_file

    out = run_train(tmp_path, "--pattern", "single", "--max-steps", "1")
    head = load_file(out / "head0.pth")
    cfg = train.TrainConfig.from_flags("digits", arch=CPU_ARCH, pattern="ilr2", weights=str(out / "head0.pth"))
    net = build_model(cfg.model, 10, torch.device("cpu"), initial_weights(cfg.model)[0])
    a, b = net.levels[0][0], net.levels[0][1]
    torch.testing.assert_close(a["layer3"].state_dict(), {k[len("layer3."):]: v for k, v in head.items()
                                                           if k.startswith("layer3.")})
    assert torch.equal(a["layer3"][0].conv1.weight, b["layer3"][0].conv1.weight)
    assert not torch.equal(a["fc"].weight, b["fc"].weight)  # each head's classifier is its own
    net.eval()
    with torch.no_grad():
        logits = net(torch.randn(4, 3, 32, 32))
    assert (logits[0] - logits[1]).abs().max() > 1e-3


def test_eta_under_accumulation_and_epoch_numbers(tmp_path, capsys):
    # The ETA is the remaining optimizer steps times the measured time per optimizer step (it used to
    # divide by accum_steps twice), and every line names the epoch it belongs to, 1-based.
    out = run_train(tmp_path, "--pattern", "single", "-b", "256", "--accum-steps", "4", "--epochs", "2",
                    "--log-every", "2", "--progress", "off")
    tr, ev = records(out, "train"), records(out, "eval")
    first, last = tr[0], tr[-1]
    remaining = last["time"] - first["time"]
    assert first["eta_s"] == pytest.approx(remaining, rel=0.6)
    assert [r["epoch"] for r in ev] == [1, 2]
    steps = len(tr) and max(r["step"] for r in tr)
    assert {r["epoch"] for r in tr} == {1, 2} and steps == 10
    text = capsys.readouterr().out
    assert "epoch 1/2 eval" in text and "epoch 2/2 eval" in text and "epoch 0" not in text


@pytest.mark.parametrize("pattern", ["ilr2", "hier4"])
def test_compiled_step_is_one_graph_without_breaks(tmp_path, monkeypatch, pattern):
    # The real trainer with --compile, through a counting backend: the rescaling ops were loaded when the
    # model was built, so tracing never enters the loader and the model compiles as one graph.
    from torch._dynamo.testing import CompileCounter
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    cnt = CompileCounter()
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: real(m, backend=cnt))
    run_train(tmp_path, "--pattern", pattern, "--compile", "--max-steps", "2", "--image-size", "16")
    assert not counters["graph_break"], dict(counters["graph_break"])
    # whole-model graphs only: training, evaluation (eval mode, no grad) and evaluation's short last batch
    # (360 test digits at batch 32: a dynamic-shape recompile), never a graph per fragment
    assert 2 <= cnt.frame_count <= 3
    torch._dynamo.reset()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_training_run(tmp_path):
    # On a GPU host: the GPU defaults (bf16 autocast, channels-last), GPU memory in the records, a finite loss.
    out = tmp_path / "gpu"
    assert train.main(["synthetic", "--device", "cuda", "--arch", "resnet18", "--pattern", "hier4", "-b", "16",
                       "--image-size", "64", "--max-steps", "4", "--log-every", "1", "--output", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["amp"] == "bf16" and cfg["channels_last"] is True
    tr = records(out, "train")
    assert len(tr) == 4 and all(math.isfinite(r["loss"]) for r in tr) and tr[0]["peak_mem_mb"] > 0


def test_skipped_first_step_leaves_the_model_finite(tmp_path, monkeypatch):
    # The fused SGD's momentum buffers: a first step skipped through found_inf must not leave them uninitialised.
    _poison_step(monkeypatch, 1)
    out = run_train(tmp_path, "--pattern", "ilr2", "--max-steps", "3", "--skip-nonfinite", "--log-every", "1")
    assert records(out, "train")[-1]["skipped_steps"] == 1
    model = load_checkpoint(out / "last.pt")["model"]
    assert all(torch.isfinite(t).all() and t.abs().max() < 1e3 for t in model.values() if t.is_floating_point())
    opt = optim.make_optimizer(build("resnet32", "single"), train.TrainConfig.from_flags("digits", lr=0.1).optim)
    assert all(torch.equal(s["momentum_buffer"], torch.zeros_like(s["momentum_buffer"])) for s in opt.state.values())


def test_eval_only_without_a_checkpoint_refuses(tmp_path, capsys):
    code = train.main([*BASE, "--output", str(tmp_path / "none"), "--eval-only", "--resume", "auto"])
    assert code == 2
    assert "evaluating an untrained network" in capsys.readouterr().err


def test_accumulation_under_compiled_ddp_syncs_once(tmp_path, monkeypatch):
    # torch.compile's wrapper is not a DistributedDataParallel: no_sync must still be found behind it.
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        net = build("resnet32", "ilr2")
        ddp = torch.nn.parallel.DistributedDataParallel(net)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        step = train.Step(train.TrainConfig.from_flags("digits", accum_steps=4), torch.compile(ddp, backend="eager"), net,
                          opt)
        assert step.ddp is ddp
        assert train.Step(train.TrainConfig.from_flags("digits"), net, net, opt).ddp is None
    finally:
        dist.destroy_process_group()


def test_eval_only_leaves_the_training_record_as_it_was(tmp_path):
    out = run_train(tmp_path, "--pattern", "ilr2", "--max-steps", "2")
    before = {f: (out / f).read_bytes() for f in ("config.json", "metrics.jsonl")}
    assert train.main([*BASE, "--pattern", "ilr2", "--output", str(out), "--resume", "auto", "--eval-only",
                       "-b", "64"]) == 0
    assert {f: (out / f).read_bytes() for f in before} == before
    assert json.loads((out / "eval.json").read_text())["eval"]["top1"] >= 0


def test_resume_to_more_epochs_keeps_the_resolved_milestones(tmp_path, capsys):
    out = run_train(tmp_path, "--pattern", "single", "-b", "256", "--epochs", "3")
    assert json.loads((out / "config.json").read_text())["lr_milestones"] == [1.0, 2.0, 2.667]
    assert train.main([*BASE, "--pattern", "single", "-b", "256", "--epochs", "4", "--output", str(out),
                       "--resume", "auto"]) == 0
    assert "keeping the checkpoint's LR milestones" in capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["lr_milestones"] == [1.0, 2.0, 2.667]
    lrs = [r["lr"] for r in records(out, "train")]
    assert lrs[-1] == pytest.approx(lrs[0] * 1e-3, rel=1e-6)  # epoch 4 stays after the third step


def test_resume_to_more_epochs_of_a_cosine_schedule_says_the_lr_changes(tmp_path, capsys):
    # A cosine schedule follows --epochs: continuing to more epochs raises the LR (0 at the old end): said.
    cosine = [*BASE, "--pattern", "single", "-b", "256", "--schedule", "cosine"]
    out = run_train(tmp_path, *cosine[len(BASE):], "--epochs", "2", "--max-steps", "3")
    capsys.readouterr()
    # the same schedule, continued: no word
    assert train.main([*cosine, "--epochs", "2", "--output", str(out), "--resume", "auto"]) == 0
    assert "schedule differs" not in capsys.readouterr().err
    assert train.main([*cosine, "--epochs", "4", "--output", str(out), "--resume", "auto"]) == 0
    err = capsys.readouterr().err
    assert "(--epochs 2 -> 4; a cosine schedule follows --epochs)" in err, err
    assert "where the checkpoint's schedule gives 0;" in err and json.loads((out / "config.json").read_text())["epochs"] == 4


def test_a_new_run_from_an_old_runs_config_leaves_the_old_run_alone(tmp_path, monkeypatch, capsys):
    old = run_train(tmp_path, "--pattern", "single", "--max-steps", "1", "--overwrite")
    cfg = json.loads((old / "config.json").read_text())
    assert cfg["output"] == str(old) and cfg["overwrite"] is True
    before = {f: (old / f).read_bytes() for f in ("last.pt", "metrics.jsonl", "head0.pth")}
    monkeypatch.chdir(tmp_path)  # the default run folder, runs/..., lands here
    assert train.main(["--config", str(old / "config.json"), "--max-steps", "2", "--progress", "off"]) == 0
    assert {f: (old / f).read_bytes() for f in before} == before
    assert (tmp_path / "runs" / f"digits_{CPU_ARCH}_single" / "last.pt").is_file()
    assert "ignoring output, overwrite" in capsys.readouterr().err


def test_the_largest_declared_seed_trains_with_every_seeded_stream(tmp_path):
    # --seed takes 0 to 2^63 - 1: numpy's global seed (32 bits), the erasing/augmentation/noise generators
    # (seeds derived past 64 bits) used to refuse it
    out = run_train(tmp_path, "--pattern", "ilr2", "--max-steps", "2", "--seed", str(2**63 - 1), "--random-erase",
                    "0.5", "--auto-augment", "trivialaugment", "--label-noise", "0.2", "--mixup", "0.2")
    assert [r["step"] for r in records(out, "train")] == [1, 2]


def test_opt_eps_below_float32_is_refused_in_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        train.main([*BASE, "--opt", "adamw", "--opt-eps", "1e-300"])
    assert e.value.code == 2 and "--opt-eps must be in [1e-30, inf), got 1e-300" in capsys.readouterr().err


def test_resume_with_another_optimizer_is_one_line(tmp_path, capsys):
    out = run_train(tmp_path, "--pattern", "single", "--max-steps", "1")
    for opt in ("adamw", "lamb", "lars"):
        capsys.readouterr()
        assert train.main([*BASE, "--pattern", "single", "--opt", opt, "--output", str(out), "--resume", "auto",
                           "--max-steps", "2"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err, err
        assert f"was trained with --opt sgd, this run asks for --opt {opt}" in err
        assert "--weights" in err


def _torchrun(args, out, env=None):
    env = dict(env or os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                             "-m", "collab_fast.train", *BASE, *args, "--output", str(out), "--progress", "off"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_ddp_signal_to_one_rank_stops_both_with_a_checkpoint(tmp_path):
    # SIGTERM to one worker only: the ranks agree at the next check, both stop at the same step, rank 0 writes
    # last.pt (it used to deadlock both ranks in futex waits, and the signalled rank claimed a write).
    out = tmp_path / "sig"
    proc = _torchrun(["--pattern", "ilr2", "-b", "32", "--image-size", "8", "--epochs", "20"], out)
    lines, deadline = [], time.time() + 240
    while time.time() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        if "step 3:" in line:
            break
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, (workers, lines[-5:])
    os.kill(int(workers[-1]), signal.SIGTERM)  # rank 1 (or 0): one of them only
    try:
        rest, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the job hung after one rank got SIGTERM: " + "".join(lines[-5:]))
    assert (out / "last.pt").is_file()
    assert rest.count("wrote") == 1, rest[-2000:]
    assert load_checkpoint(out / "last.pt")["state"]["step"] >= 3
    # a clean stop: every worker exits 0 and torchrun ends quietly (no ChildFailedError, no traceback)
    assert proc.returncode == 0 and "Traceback" not in rest and "FAILED" not in rest, rest[-3000:]


@pytest.mark.slow
def test_ddp_nonfinite_on_one_rank_is_skipped_on_both(tmp_path):
    # One rank's batch is NaN: both ranks see the step as non-finite (agreed on the device) and skip it.
    out = tmp_path / "nan"
    plug = tmp_path / "plug"
    plug.mkdir()
    (plug / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '1':\n"
        "    from collab_fast.data import memory\n"
        "    real = memory.DeviceLoader.iter_from\n"
        "    def poisoned(self, start):\n"
        "        for i, (x, y) in enumerate(real(self, start)):\n"
        "            yield (x * float('nan') if self.shuffle and i == 1 else x), y\n"
        "    memory.DeviceLoader.iter_from = poisoned\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(plug), os.environ.get("PYTHONPATH", "")]))
    proc = _torchrun(["--pattern", "ilr2", "-b", "32", "--image-size", "8", "--max-steps", "4", "--skip-nonfinite"],
                     out, env=env)
    try:
        text, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the job hung on a non-finite loss on one rank")
    assert proc.returncode == 0, text[-3000:]
    assert records(out, "train")[-1]["skipped_steps"] == 1


@pytest.mark.slow
def test_dali_resume_after_a_signal_skips_no_batch(tmp_path, monkeypatch):
    # SIGTERM arrives during step 3: the run stops before fetching batch 4, so the saved reader position is
    # after batch 3 and the resumed run trains on batch 4 (it used to be one batch ahead: batch 4 skipped).
    pytest.importorskip("nvidia.dali")
    data = write_toy(tmp_path / "toy", classes=3, per_class=8, size=40, val_per_class=1)
    common = ["toy", "--device", "cpu", "--data", str(data), "--arch", "resnet18", "--pattern", "ilr2",
              "--image-size", "32", "-b", "4", "--log-every", "1", "--threads", "1", "--epochs", "2",
              "--max-steps", "8"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert train.main([*common, "--output", str(full)]) == 0
    real, calls = train.Step.__call__, {"n": 0}

    def signalled(self, x, y, meter=None):
        calls["n"] += 1
        out = real(self, x, y, meter)
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(train.Step, "__call__", signalled)
    with pytest.raises(SystemExit):
        train.main([*common, "--output", str(part)])
    monkeypatch.setattr(train.Step, "__call__", real)
    assert load_checkpoint(part / "last.pt")["state"]["step"] == 3
    assert train.main([*common, "--output", str(part), "--resume", "auto"]) == 0
    assert [r["loss"] for r in records(full, "train")] == [r["loss"] for r in records(part, "train")]


@pytest.mark.parametrize("name, cls", [("adamw", "AdamW"), ("lamb", "LAMB"), ("lars", "LARS")])
def test_opt_flag_trains_with_that_optimizer(tmp_path, monkeypatch, name, cls):
    made = []
    real = optim.make_optimizer
    monkeypatch.setattr(optim, "make_optimizer", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    out = run_train(tmp_path, "--pattern", "ilr2", "--opt", name, "--max-steps", "4", "--skip-nonfinite")
    assert [type(o).__name__ for o in made] == [cls]
    losses = [r["loss"] for r in records(out, "train")]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    assert json.loads((out / "config.json").read_text())["opt"] == name


def test_clip_grad_clips_the_global_norm_on_the_device(tmp_path, monkeypatch):
    norms = []
    real = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, **kw):
        total = real(params, max_norm, **kw)
        norms.append((max_norm, kw.get("foreach"), total))
        return total

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    run_train(tmp_path, "--max-steps", "2", "--clip-grad", "0.01")
    assert [(m, f) for m, f, _ in norms] == [(0.01, True), (0.01, True)]
    assert all(t > 0.01 for *_, t in norms)  # the norm was above the bound: it clipped


def test_drop_path_and_sync_bn_flags(tmp_path, monkeypatch, capsys):
    built = []
    real = builder.build_model
    monkeypatch.setattr(builder, "build_model", lambda *a, **k: built.append(real(*a, **k)) or built[-1])
    out = run_train(tmp_path, "--max-steps", "1", "--drop-path", "0.1", "--sync-bn")
    assert max(getattr(m, "drop_path", 0.0) for m in built[0].modules()) == pytest.approx(0.1)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["drop_path"] == 0.1 and cfg["sync_bn"] is True
    assert "--sync-bn has nothing to synchronise in a single process" in capsys.readouterr().err


@pytest.mark.slow
def test_modern_recipe_trains_on_the_toy_set_with_ema_and_plain_checkpoints(tmp_path):
    # torchvision's 2021 ResNet-50 recipe's regularisers (label smoothing, mixup, cutmix, TrivialAugment, random
    # erasing, EMA, warm-up + cosine) at a toy scale: the loss falls and the run folder holds both weights.
    toy = write_toy(tmp_path / "toy", classes=4, per_class=40, size=40, val_per_class=10)
    out = tmp_path / "run"
    argv = ["toy", "--recipe", "imagenet-resnet50-tv2", "--data", str(toy), "--device", "cpu", "--arch", CPU_ARCH,
            "--pattern", "ilr2", "--image-size", "32", "-b", "16", "--epochs", "8", "--warmup-epochs", "1",
            "--lr", "0.05", "--model-ema", "0.9", "--log-every", "1", "--output", str(out), "--loader", "torch",
            "--threads", "1"]
    assert train.main(argv) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["mixup"], cfg["cutmix"], cfg["random_erase"], cfg["label_smoothing"], cfg["schedule"],
            cfg["auto_augment"]) == (0.2, 1.0, 0.1, 0.1, "cosine", "trivialaugment")
    losses = [r["loss"] for r in records(out, "train")]
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10, losses
    ckpt = load_checkpoint(out / "last.pt")
    assert set(ckpt["ema"]) == set(ckpt["model"])
    assert "ema_top1" in records(out, "eval")[-1]


def test_weights_file_is_read_once(tmp_path, monkeypatch):
    out = run_train(tmp_path, "--pattern", "ilr2", "--max-steps", "1", name="first")
    reads = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: reads.append(str(f)) or real(f, *a, **k))
    run_train(tmp_path, "--pattern", "ilr2", "--max-steps", "1", "--weights", str(out / "last.pt"), name="second")
    assert reads.count(str(out / "last.pt")) == 1


def _agree_worker(rank, port, paths, steps, q):
    import torch.distributed as tdist

    from collab_fast.checkpoint import CheckpointError
    from collab_fast.distributed import Dist

    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        proc = Dist(rank, 2, rank)
        from pathlib import Path

        agree_on_resume(proc, Path(paths[rank]) if paths[rank] else None)
        agree_on_resume(proc, Path(paths[rank]) if paths[rank] else None, steps[rank])
        q.put((rank, "ok"))
    except CheckpointError as exc:
        q.put((rank, str(exc)))
    finally:
        tdist.destroy_process_group()


@pytest.mark.parametrize("paths, steps, want", [
    (["/ckpt/last.pt", None], [7, 0], "rank(s) 1 of 2 cannot see /ckpt/last.pt (no shared file system?)"),
    (["/a/last.pt", "/b/last.pt"], [7, 9], "the ranks loaded different checkpoints (rank 0: step 7, rank 1: step 9)"),
    (["/a/last.pt", "/b/last.pt"], [7, 7], "ok"),  # local copies of one checkpoint
    ([None, None], [0, 0], "ok"),  # a fresh run
])
def test_ranks_agree_on_what_they_resume_or_all_refuse(paths, steps, want):
    # A node that cannot see last.pt started afresh while the others resumed, and the job hung at the first
    # collective: every rank now refuses in one line.
    import socket

    import torch.multiprocessing as tmp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = tmp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_agree_worker, args=(r, port, paths, steps, q)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(q.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(60)
    assert all(want in got[r] for r in (0, 1)), got
