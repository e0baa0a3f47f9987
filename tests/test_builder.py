"""models/builder.py: the model section (initial weights, sync-BN, DDP/FSDP, compile), build specs, drop path."""

from pathlib import Path

import pytest
import torch
from torch import nn

from collab_fast.models import build


def test_drop_path_flag_reaches_each_library_and_is_refused_without_residual_blocks():
    from collab_fast.models import ModelConfig

    with pytest.raises(ValueError, match="--drop-path: densenet40_12 has no residual blocks"):
        ModelConfig(arch="densenet40_12", drop_path=0.1)
    with pytest.raises(ValueError, match="--drop-path must be in"):
        ModelConfig(drop_path=1.0)
    from collab_fast.models import builder

    seen = {}
    real = builder.build
    try:
        builder.build = lambda *a, **kw: seen.update(kw) or real("resnet32", "single", num_classes=10)
        builder.build_model(ModelConfig(arch="timm:resnet50", pattern="single", drop_path=0.1))
        assert seen["drop_path_rate"] == 0.1
        builder.build_model(ModelConfig(arch="torchvision:convnext_tiny", pattern="single", drop_path=0.2))
        assert seen["stochastic_depth_prob"] == 0.2
    finally:
        builder.build = real


def test_sync_bn_converts_on_gpus_and_refuses_on_cpu():
    from collab_fast.distributed import Dist
    from collab_fast.models.builder import sync_batchnorm

    net = build("resnet32", "ilr2", num_classes=10)
    keys = set(net.state_dict())
    assert sync_batchnorm(net, Dist(), torch.device("cpu")) is net  # one process: nothing to synchronise
    with pytest.raises(ValueError, match="--sync-bn needs CUDA"):
        sync_batchnorm(net, Dist(rank=0, world=2), torch.device("cpu"))
    out = sync_batchnorm(net, Dist(rank=0, world=2), torch.device("cuda"))  # the conversion itself runs anywhere
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in out.modules())
    assert not any(type(m) is torch.nn.BatchNorm2d for m in out.modules()) and set(out.state_dict()) == keys


_FSDP2 = """
import os, sys, torch, torch.distributed as dist, torch.multiprocessing as mp

def run(rank, store):
    dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2)
    from torch.distributed.fsdp import fully_shard
    from collab_fast import fused_collab_loss
    from collab_fast.models import build
    torch.manual_seed(0)
    ref = build("resnet32", "hier4", num_classes=10)
    torch.manual_seed(0)
    model = build("resnet32", "hier4", num_classes=10)
    for segment in [model.trunk, *[copy for level in model.levels for copy in level]]:
        fully_shard(segment)  # each head segment its own FSDP unit
    fully_shard(model)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)
    opt, ref_opt = torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(ref.parameters(), lr=0.1)
    for _ in range(2):
        loss = fused_collab_loss(model(x[4 * rank:4 * rank + 4]), y[4 * rank:4 * rank + 4])
        opt.zero_grad(); loss.backward(); opt.step()
        # the same two half-batches on one process, their mean loss (the gradient FSDP averages)
        ref_loss = (fused_collab_loss(ref(x[:4]), y[:4]) + fused_collab_loss(ref(x[4:]), y[4:])) / 2
        ref_opt.zero_grad(); ref_loss.backward(); ref_opt.step()
    err = max((p.full_tensor() - q).abs().max().item() for p, q in zip(model.parameters(), ref.parameters()))
    if rank == 0:
        print("SHARDED", type(model.trunk).__name__, type(model.levels[1][3]).__name__, "MAXERR", err, flush=True)
    dist.barrier()  # neither rank tears its group down while the other still talks to it
    dist.destroy_process_group()
    os._exit(0)  # gloo on CPU can still abort a worker in the interpreter's teardown (seen in CI): skip it

if __name__ == "__main__":
    mp.spawn(run, args=(sys.argv[1],), nprocs=2)
"""


def test_fsdp2_shards_each_head_segment(tmp_path):
    # Segments are Modules with a forward (a ModuleDict was refused by fully_shard): two CPU processes (gloo),
    # each segment an FSDP2 unit, two SGD steps equal to the unsharded model's on the same half-batches.
    import subprocess
    import sys

    script = tmp_path / "fsdp2.py"
    script.write_text(_FSDP2)
    import os

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                       os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, str(script), str(tmp_path / "store")], capture_output=True, text=True,
                         timeout=600, cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("SHARDED"))
    _, trunk, copy, _, err = line.split()
    assert trunk == copy == "FSDPSegment" and float(err) < 1e-6, line


def test_build_records_how_to_build_the_network_again():
    model = build("resnet32", "hier4", num_classes=7, splits=["layer1", "layer2"])
    assert model.build_spec == dict(arch="resnet32", pattern="hier4", num_classes=7, rescale="backprop",
                                    splits=["layer1", "layer2"])
    again = build(**model.build_spec)
    assert again.load_state_dict(model.state_dict()) is not None and again.splits == model.splits
    assert build("resnet32", "single", num_classes=7).build_spec["splits"] is None
    assert build("resnet18", "ilr2", num_classes=7, zero_init_residual=True).build_spec["zero_init_residual"] is True
    # a constructor argument that is an object (not a plain value) records no spec: it would not load under
    # weights_only=True
    from collab_fast.models.builder import _plain

    assert _plain({"a": [1, 2.0, "x", None, (True,)]}) and not _plain({"norm_layer": nn.BatchNorm2d})


def test_the_model_section_builds_the_training_model_in_one_order(tmp_path):
    from collab_fast.distributed import Dist
    from collab_fast.models import ModelConfig

    cfg = ModelConfig(arch="resnet32", pattern="ilr2", channels_last=False)
    net, model = cfg.build(10, device=torch.device("cpu"), proc=Dist(), image_size=32, in_chans=3)
    assert model is net and net.num_heads == 2 and net.levels[0][0].fc.out_features == 10  # one process: no wrapper
    compiled = ModelConfig(arch="resnet32", pattern="single", channels_last=False, compile=True)
    net, model = compiled.build(10, device=torch.device("cpu"), proc=Dist(), image_size=32, in_chans=3)
    assert model is not net and getattr(model, "_orig_mod", None) is net  # compile wraps the bare network
    # --weights: an exported head starts every copy, a checkpoint or pattern single is loaded whole
    head = build("resnet32", "single", num_classes=10)
    torch.save(head.state_dict(), tmp_path / "head.pth")
    seeded = ModelConfig(arch="resnet32", pattern="ilr2", weights=str(tmp_path / "head.pth"), channels_last=False)
    net, _ = seeded.build(10, device=torch.device("cpu"), proc=Dist(), image_size=32, in_chans=3)
    a, b = net.levels[0][0], net.levels[0][1]
    assert torch.equal(a["layer3"][0].conv1.weight, head.layer3[0].conv1.weight)
    assert torch.equal(a["layer3"][0].conv1.weight, b["layer3"][0].conv1.weight)
    single = ModelConfig(arch="resnet32", pattern="single", weights=str(tmp_path / "head.pth"), channels_last=False)
    net, _ = single.build(10, device=torch.device("cpu"), proc=Dist(), image_size=32, in_chans=3)
    assert all(torch.equal(v, head.state_dict()[k]) for k, v in net.state_dict().items())
