"""distributed.py: one process alone (the multi-process paths run in test_train.py's DDP tests)."""

import pytest
import torch

from collab_fast.distributed import Dist, cleanup, init_distributed


def test_one_process_reduces_and_gathers_to_itself(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    d, device = init_distributed("cpu")
    assert d == Dist(0, 1, 0) and d.main and device == torch.device("cpu")
    t = torch.tensor([1.0, 2.0])
    assert d.all_reduce(t) is t and torch.equal(t, torch.tensor([1.0, 2.0]))
    assert d.gather({"a": 1}) == [{"a": 1}]
    cleanup(d)  # nothing to tear down
    assert not Dist(rank=1, world=2).main


def test_bad_device_is_one_line(monkeypatch):
    with pytest.raises(ValueError, match="device must be auto, cuda or cpu, got 'gpu'"):
        init_distributed("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="--device cuda: no CUDA device is available to this torch .*use --device cpu"):
        init_distributed("cuda")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_distributed("auto")[1] == torch.device("cpu")
