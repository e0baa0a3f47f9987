"""MNIST-format data sets (collab_fast/data/idx.py): the IDX reader, its checks, the grey loaders, the trainer."""

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from collab_fast import train
from collab_fast.data import DataConfig, build_loaders, normalization
from collab_fast.data.idx import IDX_SETS, find_idx_files, load_idx_set, read_idx, write_idx
from collab_fast.export import main as export_main
from collab_fast.models import ModelConfig, build, build_model, input_channels

STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def write_set(root: Path, n_train=40, n_test=20, size=28, gz=True, classes=10, seed=0) -> Path:
    """Four small IDX files: image k of class c has a bright square at a class-dependent place (learnable)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for stem_x, stem_y, n in ((STEMS[0], STEMS[1], n_train), (STEMS[2], STEMS[3], n_test)):
        y = np.arange(n) % classes
        x = rng.integers(0, 40, (n, size, size), dtype=np.uint8)
        for i, c in enumerate(y):
            r, q = divmod(int(c), 4)
            x[i, 2 + 6 * r: 8 + 6 * r, 2 + 6 * q: 8 + 6 * q] = 250
        suffix = ".gz" if gz else ""
        write_idx(root / (stem_x + suffix), x, gz=gz)
        write_idx(root / (stem_y + suffix), y.astype(np.uint8), gz=gz)
    return root


@pytest.mark.parametrize("gz", [True, False])
def test_round_trip_and_shapes(tmp_path, gz):
    root = write_set(tmp_path / "fm", gz=gz)
    (x, y), (xt, yt) = load_idx_set("fashion-mnist", root)
    assert x.shape == (40, 28, 28, 1) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert xt.shape == (20, 28, 28, 1) and yt.tolist() == [i % 10 for i in range(20)]
    raw = read_idx(root / (STEMS[0] + (".gz" if gz else "")), 3)
    assert np.array_equal(raw, x[..., 0].numpy())


@pytest.mark.parametrize("layout", ["", "raw", "FashionMNIST/raw"])
def test_files_found_where_torchvision_keeps_them(tmp_path, layout):
    write_set(tmp_path / layout if layout else tmp_path, gz=False)
    files = find_idx_files("fashion-mnist", tmp_path)
    assert files["train"][0].name == STEMS[0] and files["test"][1].name == STEMS[3]


def test_missing_files_say_how_to_get_them(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"--data .*: the fashion-mnist IDX files .* `apt-get install "
                                                r"dataset-fashion-mnist"):
        find_idx_files("fashion-mnist", tmp_path)
    monkeypatch.setitem(IDX_SETS, "fashion-mnist", (10, str(tmp_path / "absent"), "HOW"))
    with pytest.raises(FileNotFoundError, match="no --data DIR given and no system copy found; get the files with HOW"):
        find_idx_files("fashion-mnist", None)
    write_set(tmp_path / "sys")
    monkeypatch.setitem(IDX_SETS, "fashion-mnist", (10, str(tmp_path / "sys"), "HOW"))
    assert find_idx_files("fashion-mnist", None)["train"][0].parent == tmp_path / "sys"  # the package's folder


def _damage(path: Path, how: str) -> None:
    data = gzip.decompress(path.read_bytes())
    if how == "magic":
        data = b"\x00\x00\x0d" + data[3:]
    elif how == "ndim":
        data = data[:3] + b"\x01" + data[4:]
    elif how == "header":
        data = data[:10]
    elif how == "truncated":
        data = data[:-5]
    elif how == "trailing":
        data = data + b"\x00" * 3
    elif how == "zero":
        data = data[:4] + b"\x00\x00\x00\x00" + data[8:]
    elif how == "huge":
        data = data[:4] + b"\xff\xff\xff\xff" + data[8:]
    if how == "gzip":
        path.write_bytes(path.read_bytes()[:40])  # a gzip stream cut short
    elif how == "empty":
        path.write_bytes(b"")
    else:
        path.write_bytes(gzip.compress(data))


@pytest.mark.parametrize("how, match", [
    ("magic", "is not an unsigned-byte IDX file"),
    ("ndim", "holds a 1-dimensional array where 3 dimensions belong"),
    ("header", "is truncated .its header ends early"),
    ("truncated", r"is truncated \(header: \(40, 28, 28\)\)"),
    ("trailing", "has bytes beyond the array its header declares"),
    ("zero", "declares an array of shape"),
    ("huge", "declares an array of shape"),
    ("gzip", "cannot be read"),
    ("empty", "is not an unsigned-byte IDX file .magic missing"),
])
def test_a_bad_image_file_is_one_line_naming_it(tmp_path, how, match):
    root = write_set(tmp_path / "fm")
    bad = root / (STEMS[0] + ".gz")
    _damage(bad, how)
    with pytest.raises(ValueError, match=match) as exc:
        load_idx_set("fashion-mnist", root)
    assert str(bad) in str(exc.value) and "\n" not in str(exc.value)


def test_counts_and_label_range_are_checked(tmp_path):
    root = write_set(tmp_path / "a", gz=False)
    write_idx(root / STEMS[1], np.zeros(39, dtype=np.uint8))
    with pytest.raises(ValueError, match="holds 40 images but .* 39 labels; the files do not belong together"):
        load_idx_set("fashion-mnist", root)
    root = write_set(tmp_path / "b", gz=False)
    write_idx(root / STEMS[3], np.full(20, 10, dtype=np.uint8))
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte holds label 10; fashion-mnist has classes 0..9"):
        load_idx_set("fashion-mnist", root)
    root = write_set(tmp_path / "c", gz=False)
    (root / STEMS[1]).rename(root / "x")
    (root / STEMS[0]).rename(root / STEMS[1])
    (root / "x").rename(root / STEMS[0])
    with pytest.raises(ValueError, match="are the image and label files swapped"):
        load_idx_set("fashion-mnist", root)


def test_grey_loaders(tmp_path):
    root = write_set(tmp_path / "fm")
    train_l, val_l, n = build_loaders(DataConfig("fashion-mnist", root=str(root)), batch_size=8, channels_last=True)
    x, y = next(iter(train_l))
    assert n == 10 and x.shape == (8, 1, 28, 28) and x.is_contiguous(memory_format=torch.channels_last)
    assert train_l.pad == 4 and train_l.flip  # Fashion-MNIST: crop + flip
    xv, yv = next(iter(val_l))
    mean, std = normalization("fashion-mnist")
    raw = load_idx_set("fashion-mnist", root)[1][0][:8].permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(xv, (raw - mean[0]) / std[0])  # evaluation: no augmentation, normalised
    # as 3 equal channels (a torchvision network) and at another size (resized once at load)
    _, val3, _ = build_loaders(DataConfig("fashion-mnist", root=str(root), image_size=32), batch_size=4, channels=3)
    x3, _ = next(iter(val3))
    assert x3.shape == (4, 3, 32, 32) and torch.equal(x3[:, 0], x3[:, 2])
    with pytest.raises(ValueError, match="cifar10 has 3-channel images; they cannot be given as 1 channels"):
        build_loaders(DataConfig("cifar10", root=str(tmp_path)), batch_size=8, channels=1)
    mn, _, _ = build_loaders(DataConfig("mnist", root=str(root)), batch_size=8)
    assert not mn.flip  # a mirrored digit is another digit


def test_holdout_and_label_noise(tmp_path):
    root = write_set(tmp_path / "fm", n_train=100)
    train_l, val_l, _ = build_loaders(DataConfig("fashion-mnist", root=str(root), holdout=20, label_noise=0.5),
                                      batch_size=10)
    assert train_l.num_samples == 80 and val_l.num_samples == 20
    noisy, true = train_l.noise.noisy, train_l.noise.true
    assert noisy.sum() == 40
    train_l.set_epoch(0)
    a = train_l.labels.clone()
    train_l.set_epoch(1)
    assert torch.equal(a[~noisy], true[~noisy]) and torch.equal(train_l.labels[~noisy], true[~noisy])
    assert not torch.equal(a[noisy], train_l.labels[noisy])  # the corrupted part is redrawn every epoch


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(),
                    reason="the dataset-fashion-mnist package is not installed")
def test_the_real_fashion_mnist_files():
    (x, y), (xt, yt) = load_idx_set("fashion-mnist", None)
    assert x.shape == (60000, 28, 28, 1) and xt.shape == (10000, 28, 28, 1)
    assert torch.bincount(y).tolist() == [6000] * 10 and torch.bincount(yt).tolist() == [1000] * 10
    mean, std = normalization("fashion-mnist")
    assert abs(x.float().mean().item() / 255 - mean[0]) < 1e-4 and abs(x.float().std().item() / 255 - std[0]) < 1e-4


def test_models_take_grey_input():
    assert input_channels("resnet32", 1) == 1 and input_channels("timm:resnet18", 1) == 1
    assert input_channels("torchvision:resnet18", 1) == 3 and input_channels("resnet50", 3) == 3
    for arch in ("resnet32", "densenet40_12", "resnet18"):
        net = build_model(ModelConfig(arch=arch, pattern="ilr2"), 10, in_chans=1)
        assert net(torch.randn(2, 1, 28, 28)).shape == (2, 2, 10)
    with pytest.raises(ValueError, match="torchvision:resnet18 takes 3-channel images, not 1"):
        build_model(ModelConfig(arch="torchvision:resnet18", pattern="single"), 10, in_chans=1)


def test_trainer_end_to_end_and_export(tmp_path, capsys):
    root = write_set(tmp_path / "fm", n_train=64, n_test=20)
    out = tmp_path / "run"
    code = train.main(["fashion-mnist", "--data", str(root), "--device", "cpu", "--arch", "resnet32", "--pattern",
                       "hier4", "-b", "16", "--max-steps", "3", "--output", str(out)])
    assert code == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dataset"] == "fashion-mnist" and cfg["image_size"] == 28 and cfg["augment"] == "crop+flip"
    head = torch.load(out / "head0.pth", weights_only=True)
    assert head["conv1.weight"].shape == (16, 1, 3, 3)  # grey in, no channels copied
    build("resnet32", "single", in_chans=1).load_state_dict(head, strict=True)
    banner = capsys.readouterr().out
    assert "resnet32 hier4: 4 head(s)" in banner and "fashion-mnist (10 classes)" in banner
    assert export_main([str(out / "last.pt"), "--head", "3", "-o", str(tmp_path / "h3.pth")]) == 0
    assert torch.load(tmp_path / "h3.pth", weights_only=True)["conv1.weight"].shape == (16, 1, 3, 3)


def test_trainer_without_the_files_is_one_line(tmp_path, capsys):
    code = train.main(["mnist", "--data", str(tmp_path), "--device", "cpu", "--arch", "resnet32", "-b", "16",
                       "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "the mnist IDX files" in err[0] and "MNIST database" in err[0]
