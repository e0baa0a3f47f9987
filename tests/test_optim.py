"""collab_fast.optim: the optim section, the optimizer built from it, the learning-rate and soft-weight schedules."""

import math

import pytest
import torch

from collab_fast.models import build
from collab_fast.optim import OptimConfig, lr_factor, make_optimizer, soft_factor


def test_lr_schedules():
    optim = OptimConfig(epochs=90, lr=0.1, lr_milestones=[30, 60, 80])
    assert lr_factor(optim, 0, 100) == 1.0
    assert lr_factor(optim, 3000, 100) == pytest.approx(0.1)
    assert lr_factor(optim, 8000, 100) == pytest.approx(1e-3)
    optim = OptimConfig(epochs=10, schedule="cosine", warmup_epochs=1)
    assert lr_factor(optim, 0, 100) == pytest.approx(0.01)
    assert lr_factor(optim, 100, 100) == pytest.approx(1.0)
    assert lr_factor(optim, 999, 100) < 1e-4


def test_fractional_warmup_never_exceeds_the_peak():
    for warm, steps in [(0.05, 10), (0.01, 11), (1e-9, 10), (0.5, 3), (2.5, 7)]:
        optim = OptimConfig(epochs=10, warmup_epochs=warm)
        factors = [lr_factor(optim, s, steps) for s in range(10 * steps)]
        assert max(factors) <= 1.0 + 1e-12, (warm, steps, max(factors))


def test_default_milestones_follow_the_epochs():
    assert OptimConfig(epochs=90).resolved(cuda=False, world=1).lr_milestones == [30, 60, 80]
    assert OptimConfig(epochs=9, lr_milestones=[5]).resolved(cuda=False, world=1).lr_milestones == [5]
    r = OptimConfig(batch_size=128).resolved(cuda=False, world=4)
    assert r.lr == pytest.approx(0.2) and r.amp == "off"
    assert OptimConfig().resolved(cuda=True, world=1).amp == "bf16"


def test_soft_ramp():
    optim = OptimConfig(soft_ramp=2)
    f = [soft_factor(optim, s, 10) for s in (0, 10, 19, 20, 100)]
    assert f[0] == pytest.approx(math.exp(-5)) and f[1] == pytest.approx(math.exp(-5 / 4))
    assert f[2] < 1 and f[3] == f[4] == 1.0
    assert soft_factor(OptimConfig(), 0, 10) == 1.0


def test_no_weight_decay_on_norms_and_biases_and_zeroed_momentum():
    model = build("resnet32", "single", num_classes=10)
    opt = make_optimizer(model, OptimConfig(lr=0.1, wd=5e-4))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() > 1 for p in decay["params"]) and all(p.dim() <= 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert all(torch.count_nonzero(opt.state[p]["momentum_buffer"]) == 0 for p in model.parameters())


def test_unset_lr_and_bad_values_refused():
    with pytest.raises(ValueError, match="lr is unset"):
        make_optimizer(build("resnet32", "single", num_classes=10), OptimConfig())
    with pytest.raises(ValueError, match="--momentum"):
        OptimConfig(momentum=1.0)
    with pytest.raises(ValueError, match="multiple of --accum-steps"):
        OptimConfig(batch_size=10, accum_steps=3)
