"""The export CLI: a head of a training checkpoint as the plain model, and its one-line errors."""

import json
from pathlib import Path

import torch

from collab_fast.checkpoint import FORMAT, save_checkpoint
from collab_fast.export import main as export_main
from collab_fast.models import build

MANIFEST = Path(__file__).resolve().parents[1] / "collab_fast" / "models" / "torchvision_resnet_manifest.json"


def _training_checkpoint(tmp_path, arch="resnet50", pattern="hier4", num_classes=1000):
    torch.manual_seed(0)
    model = build(arch, pattern, num_classes=num_classes)
    config = {"arch": arch, "pattern": pattern, "num_classes": num_classes, "rescale": "backprop", "splits": None}
    path = tmp_path / "last.pt"
    save_checkpoint({"format": FORMAT, "model": model.state_dict(), "config": config}, path)
    return model, path


def test_export_cli_resnet50_hier4(tmp_path, capsys):
    model, path = _training_checkpoint(tmp_path)
    out = tmp_path / "head2.pth"
    assert export_main([str(path), "--head", "2", "-o", str(out)]) == 0
    assert "head 2 as ResNet" in capsys.readouterr().out
    sd = torch.load(out, weights_only=True)
    single = build("resnet50", "single")
    single.load_state_dict(sd, strict=True)
    manifest = json.loads(MANIFEST.read_text())["models"]["resnet50"]
    assert {k: list(v.shape) for k, v in sd.items()} == manifest  # loads into torchvision's resnet50
    want = model.export_head(2).state_dict()
    assert all(torch.equal(sd[k], want[k]) for k in want)


def test_export_cli_errors(tmp_path, capsys):
    _, path = _training_checkpoint(tmp_path, "resnet32", "ilr2", 10)
    assert export_main([str(path), "--head", "2", "-o", str(tmp_path / "x.pth")]) == 2
    assert "--head must be in [0, 2)" in capsys.readouterr().err
    assert export_main([str(tmp_path / "missing.pt"), "-o", str(tmp_path / "x.pth")]) == 2
    assert "does not exist" in capsys.readouterr().err
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    assert export_main([str(foreign), "-o", str(tmp_path / "x.pth")]) == 2
    assert "not a collab_fast training checkpoint" in capsys.readouterr().err
    mismatch = tmp_path / "mismatch.pt"
    save_checkpoint({"format": FORMAT, "model": build("resnet32", "single").state_dict(),
                     "config": {"arch": "resnet32", "pattern": "ilr2", "num_classes": 10}}, mismatch)
    assert export_main([str(mismatch), "-o", str(tmp_path / "x.pth")]) == 2
    assert "do not fit the model" in capsys.readouterr().err
    assert export_main([str(path), "-o", str(tmp_path)]) == 2  # a directory
    assert "is a directory; give a file name" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert export_main([str(path), "-o", str(tmp_path / "file" / "head0.pth")]) == 2  # under a file
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot write") and "file/head0.pth" in err and "\n" not in err


def test_export_of_a_library_model_without_the_library_is_one_line(tmp_path, capsys, monkeypatch):
    # a checkpoint of a timm: model exported where timm does not import: one line naming what to install
    from collab_fast.extras import MissingExtra
    from collab_fast.models import external
    from collab_fast.run_state import State, snapshot

    def missing(module, arch):
        raise MissingExtra(f"--arch {arch} needs timm, which does not import here: pip install timm")

    monkeypatch.setattr(external, "_import", missing)
    net = torch.nn.Linear(2, 2)
    snapshot(tmp_path / "last.pt", net, torch.optim.SGD(net.parameters(), lr=0.1), None,
             {"arch": "timm:resnet18", "pattern": "ilr2", "num_classes": 10}, State(step=1))
    assert export_main([str(tmp_path / "last.pt"), "-o", str(tmp_path / "h.pth")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --arch timm:resnet18 needs timm, which does not import here: pip install timm"


def test_export_into_a_folder_that_cannot_be_written_is_one_line(tmp_path, capsys):
    net = build("resnet32", "ilr2", num_classes=10)
    from collab_fast.run_state import State, snapshot

    snapshot(tmp_path / "last.pt", net, torch.optim.SGD(net.parameters(), lr=0.1), None,
             {"arch": "resnet32", "pattern": "ilr2", "num_classes": 10}, State(step=1))
    (tmp_path / "file").write_text("")
    assert export_main([str(tmp_path / "last.pt"), "-o", str(tmp_path / "file" / "h.pth")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "file" in err, err
