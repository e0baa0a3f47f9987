"""Image folders without DALI: the PyTorch loader (Pillow decode), its augmentation, sharding and exact resume."""

import pytest
import torch

from collab_fast import train
from collab_fast.data import DataConfig, TorchFolderLoader, build_loaders, check_dali_wheel, scan_split, write_toy
from collab_fast.data import dali as dali_mod
from collab_fast.data.torch_folder import _crop_box


def _loader(toy, **kw):
    files, labels, classes = scan_split(toy, "train")
    args = dict(train=True, num_classes=len(classes), image_size=24, threads=0, channels_last=False)
    args.update(kw)
    return TorchFolderLoader(files, labels, 4, **args)


def test_batches_shapes_dtype_layout_and_labels(toy):
    ld = _loader(toy, channels_last=True, threads=2)
    assert len(ld) == 21 // 4  # conftest's toy: 3 classes of 7 training images
    batches = list(ld)
    assert len(batches) == 5
    x, y = batches[0]
    assert x.shape == (4, 3, 24, 24) and x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
    assert y.dtype == torch.int64 and y.min() >= 0 and y.max() < 3
    assert -3 < float(x.mean()) < 3  # normalised
    val = _loader(toy, train=False)
    assert sum(len(b[1]) for b in val) == 21  # evaluation keeps the short last batch


def test_resume_mid_epoch_is_exact_and_epochs_differ(toy):
    ld = _loader(toy)
    ld.set_epoch(1)
    full = list(ld)
    ld.set_epoch(1)
    tail = list(ld.iter_from(2))
    assert len(tail) == 3
    for (a, ya), (b, yb) in zip(full[2:], tail):
        assert torch.equal(a, b) and torch.equal(ya, yb)
    ld.set_epoch(2)
    assert not torch.equal(list(ld)[0][0], full[0][0])  # a new order and new crops each epoch
    workers = _loader(toy, threads=2)
    workers.set_epoch(1)
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(full, workers))  # workers change nothing


def test_shards_are_disjoint_and_complete(toy):
    files, labels, _ = scan_split(toy, "train")
    seen = []
    for rank in range(2):
        ld = TorchFolderLoader(files, labels, 3, train=True, num_classes=3, image_size=16, threads=0, rank=rank,
                               world=2)
        ld.set_epoch(0)
        seen += ld.order.shard()
    assert sorted(seen) == list(range(len(files)))


def test_crop_box_stays_inside_and_covers_8_to_100_percent():
    g = torch.Generator().manual_seed(0)
    for w, h in [(40, 40), (500, 375), (37, 200), (300, 20)]:
        for _ in range(50):
            left, top, right, bottom = _crop_box(w, h, g)
            assert 0 <= left < right <= w and 0 <= top < bottom <= h


def test_bad_image_is_one_line_naming_the_file(tmp_path):
    data = write_toy(tmp_path / "toy", classes=2, per_class=2, size=32, val_per_class=1)
    victim = sorted((data / "train").rglob("*.JPEG"))[0]
    files, labels, _ = scan_split(data, "train")
    victim.write_bytes(b"\xff\xd8\xff garbage \xff\xd9")
    ld = TorchFolderLoader(files, labels, 2, train=True, num_classes=2, image_size=16, threads=0)
    with pytest.raises(Exception, match=f"could not decode {victim}"):
        list(ld)


def test_auto_picks_torch_without_dali_and_trains(toy, tmp_path, monkeypatch, capsys):
    import collab_fast.data as data_mod

    monkeypatch.setattr(data_mod, "dali_installed", lambda: False)
    tr, va, classes = build_loaders(DataConfig("toy", root=str(toy), image_size=24, threads=1), batch_size=4)
    assert isinstance(tr, TorchFolderLoader) and isinstance(va, TorchFolderLoader) and classes == 3
    out = tmp_path / "run"
    assert train.main(["toy", "--device", "cpu", "--data", str(toy), "--arch", "resnet18", "--pattern", "ilr2",
                       "--image-size", "24", "-b", "4", "--max-steps", "3", "--threads", "1", "--output", str(out),
                       "--log-every", "1"]) == 0
    assert "images through the PyTorch loader" in capsys.readouterr().out


@pytest.mark.parametrize("workers", [0, 1])
def test_iterating_leaves_the_global_rng_alone(toy, workers):
    # the model's own draws (drop-path, dropout) come from torch's global RNG: the loader must not take from it
    loader = _loader(toy, threads=workers)
    torch.manual_seed(123)
    want = torch.get_rng_state()
    for start in (0, 1):
        next(iter(loader.iter_from(start)))
    assert torch.equal(torch.get_rng_state(), want)


@pytest.mark.parametrize("extra", [[], ["--drop-path", "0.2"]])
def test_torch_loader_resume_through_the_trainer_is_exact(toy, tmp_path, extra):
    common = ["toy", "--device", "cpu", "--loader", "torch", "--data", str(toy), "--arch", "resnet18", "--pattern",
              "ilr2", "--image-size", "24", "-b", "4", "--log-every", "1", "--threads", "1", "--epochs", "3", *extra]
    full, part = tmp_path / "full", tmp_path / "part"
    assert train.main([*common, "--max-steps", "7", "--output", str(full)]) == 0
    assert train.main([*common, "--max-steps", "5", "--output", str(part)]) == 0
    assert train.main([*common, "--max-steps", "7", "--output", str(part), "--resume", "auto"]) == 0
    import json

    rec = lambda o: [r["loss"] for r in map(json.loads, (o / "metrics.jsonl").read_text().splitlines())
                     if r["kind"] == "train"]
    assert rec(full) == rec(part)
    from collab_fast.checkpoint import load_checkpoint

    a, b = (load_checkpoint(o / "last.pt")["model"] for o in (full, part))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_dali_wheel_for_a_newer_cuda_than_the_driver_is_one_line(monkeypatch):
    monkeypatch.setattr(dali_mod, "_dali_wheels", lambda: ["nvidia-dali-cuda130"])
    monkeypatch.setattr(dali_mod, "driver_cuda", lambda: (12, 4))
    with pytest.raises(ValueError, match=r"nvidia-dali-cuda130 needs a CUDA 13 driver.*CUDA 12\.4.*"
                                         r"collab_fast\[dali-cuda12\]"):
        check_dali_wheel(torch.device("cuda", 0))
    check_dali_wheel(torch.device("cpu"))  # CPU pipelines need no driver
    monkeypatch.setattr(dali_mod, "driver_cuda", lambda: (13, 0))
    check_dali_wheel(torch.device("cuda", 0))  # a CUDA 13 driver runs it
    monkeypatch.setattr(dali_mod, "_dali_wheels", lambda: ["nvidia-dali-cuda120"])
    check_dali_wheel(torch.device("cuda", 0))  # and the CUDA 12 wheel too


@pytest.mark.slow
def test_sigkill_of_the_trainer_takes_its_workers_and_fork_server_with_it(toy, tmp_path):
    # The workers are the fork server's children and hold its liveness pipe: without a watch on the trainer
    # they (and the fork server) ran on for half an hour after a SIGKILL.
    import os
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "collab_fast.train", "toy", "--device", "cpu", "--loader", "torch",
                             "--data", str(toy), "--arch", "resnet18", "--image-size", "24", "-b", "4", "--epochs",
                             "100", "--threads", "2", "--progress", "off", "--output", str(tmp_path / "run")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def children(pid):
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
        return [int(p) for p in out]

    try:
        deadline, workers = time.time() + 180, []
        while time.time() < deadline and not workers:
            workers = [w for c in children(proc.pid) for w in children(c)]  # trainer -> fork server -> workers
            time.sleep(0.5)
        assert workers, "no loader workers appeared"
        spawned = children(proc.pid) + workers
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def alive(pid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    deadline = time.time() + 30
    while time.time() < deadline and any(alive(p) for p in spawned):
        time.sleep(0.2)
    left = [p for p in spawned if alive(p)]
    for p in left:
        os.kill(p, signal.SIGKILL)
    assert not left, f"still running after the trainer's SIGKILL: {left}"


class _DiesInTheWorker(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        import os
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def test_a_worker_that_dies_is_one_line():
    from collab_fast.data.images import DataError
    from collab_fast.data.torch_folder import _one_line_errors

    loader = torch.utils.data.DataLoader(_DiesInTheWorker(), batch_size=2, num_workers=1,
                                         multiprocessing_context="fork")
    with pytest.raises(DataError, match=r"^a PyTorch loader worker died \(DataLoader worker \(pid.*\); the usual cause "
                                        r"is host memory: lower --threads or --batch-size$"):
        list(_one_line_errors(loader))


def test_a_bad_image_read_by_a_worker_is_one_line_through_the_trainer(tmp_path, capsys):
    # torch re-raises a worker's error with the worker's traceback in its message: the trainer prints one line
    data = write_toy(tmp_path / "toy", classes=2, per_class=4, size=32, val_per_class=1)
    victim = sorted((data / "train").rglob("*.JPEG"))[0]
    victim.write_bytes(b"\xff\xd8\xff garbage \xff\xd9")
    assert train.main(["toy", "--device", "cpu", "--loader", "torch", "--data", str(data), "--arch", "resnet18",
                       "--image-size", "16", "-b", "2", "--threads", "1", "--progress", "off", "--output",
                       str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: could not decode {victim}"), err


def test_a_decompression_bomb_is_a_bad_image_not_an_escape(tmp_path, monkeypatch):
    from PIL import Image

    from collab_fast.data.images import DataError

    data = write_toy(tmp_path / "toy", classes=2, per_class=2, size=40, val_per_class=1)
    files, labels, _ = scan_split(data, "train")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # a 40 x 40 image is then over twice the limit
    ld = TorchFolderLoader(files, labels, 2, train=True, num_classes=2, image_size=16, threads=0)
    with pytest.raises(DataError, match=r"could not decode .* \(DecompressionBombError: "):
        list(ld)
