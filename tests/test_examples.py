"""examples/collab_lm.py at a tiny size: the collaborative byte-level GPT trains, its head 0 exports as the plain
model with identical outputs, and the comparison runs over seeds."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import collab_lm  # noqa: E402


def test_head0_exports_as_the_plain_model_with_identical_logits():
    torch.manual_seed(0)
    model = collab_lm.CollabGPT(3, 1, d=32, layers=3, n_head=4, context=16).eval()
    idx = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        hidden, weight = model(idx)  # [3, 32, 32], [3, 256, 32]
        for k in range(3):
            plain = model.export_head(k).eval()
            torch.testing.assert_close(plain(idx).flatten(0, 1), hidden[k] @ weight[k].T)
        assert (hidden[0] - hidden[1]).abs().max() > 1e-3  # own top blocks: the heads differ


def test_tiny_comparison_runs(tmp_path):
    out = tmp_path / "lm.json"
    assert collab_lm.main(["--steps", "3", "--seeds", "0,1", "--corpus-bytes", "200000", "--d", "32", "--layers", "2",
                           "--top", "1", "--context", "16", "--batch", "4", "--out", str(out)]) == 0
    runs = json.loads(out.read_text())["runs"]
    assert [(r["heads"], r["seed"]) for r in runs] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert all(0 < r["val_loss_head0"] < 10 for r in runs)
    assert runs[2]["train_gflops"] > runs[0]["train_gflops"]  # the second head's top block and lm-head cost
