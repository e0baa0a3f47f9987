"""collab_fast.optim: the optim section, the optimizer built from it, the learning-rate and soft-weight schedules."""

import math

import pytest
import torch

from collab_fast.models import build
from collab_fast.optim import OptimConfig, Schedule, lr_factor, make_optimizer, soft_factor


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


def test_resumed_milestones_and_the_schedule_object():
    saved = {"schedule": "step", "lr_milestones": [30, 60, 80], "epochs": 90, "lr": 0.1, "warmup_epochs": 0.0}
    more = OptimConfig(epochs=120, lr=0.1)
    assert more.resolved(cuda=False, world=1, resumed=saved).lr_milestones == [30.0, 60.0, 80.0]  # kept
    assert more.resolved(cuda=False, world=1).lr_milestones == [40.0, 80.0, 106.667]  # a fresh run: the defaults
    given = OptimConfig(epochs=120, lr=0.1, lr_milestones=[50])
    assert given.resolved(cuda=False, world=1, resumed=saved).lr_milestones == [50]  # explicit: as given
    cosine = OptimConfig(epochs=120, lr=0.1, schedule="cosine").resolved(cuda=False, world=1, resumed=saved)
    assert cosine.lr_milestones == []
    schedule = Schedule(more.resolved(cuda=False, world=1, resumed=saved), steps_per_epoch=10)
    assert schedule.lr(299) == pytest.approx(0.1) and schedule.lr(300) == pytest.approx(0.01)
    assert not schedule.ramps_soft and schedule.soft(0) == 1.0
    assert schedule.change_from(saved, 300) is None  # the same schedule: nothing to say
    moved = Schedule(more.resolved(cuda=False, world=1), steps_per_epoch=10)
    text = moved.change_from(saved, 300)
    assert "--lr-milestones [30, 60, 80] -> [40.0, 80.0, 106.667]" in text and "becomes 0.1 where" in text
    ramp = Schedule(OptimConfig(soft_ramp=2, lr=0.1).resolved(cuda=False, world=1), steps_per_epoch=10)
    assert ramp.ramps_soft and ramp.soft(0) == pytest.approx(math.exp(-5)) and ramp.soft(20) == 1.0


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


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(4, 3), (5,), (2, 2, 3)]
    ps = [torch.randn(s, generator=g, dtype=torch.float64).requires_grad_() for s in shapes]
    ps.append(torch.zeros(3, 2, dtype=torch.float64, requires_grad=True))  # zero weights: trust ratio 1
    return ps


def _grads(step, ps):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in ps]


def _lamb_reference(ps, steps, lr, b1, b2, eps, wd):
    ps = [p.detach().clone() for p in ps]
    m, v = [torch.zeros_like(p) for p in ps], [torch.zeros_like(p) for p in ps]
    for t in range(1, steps + 1):
        for i, (p, g) in enumerate(zip(ps, _grads(t - 1, ps))):
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            u = (m[i] / (1 - b1**t)) / ((v[i] / (1 - b2**t)).sqrt() + eps) + wd * p
            wn, un = p.norm(), u.norm()
            r = wn / un if wn > 0 and un > 0 else 1.0
            ps[i] = p - lr * r * u
    return ps


def _lars_reference(ps, steps, lr, momentum, eta, wd):
    ps = [p.detach().clone() for p in ps]
    buf = [torch.zeros_like(p) for p in ps]
    for t in range(steps):
        for i, (p, g) in enumerate(zip(ps, _grads(t, ps))):
            d = g + wd * p
            wn, dn = p.norm(), g.norm() + wd * p.norm()  # You et al. 2017, eq. 6
            r = eta * wn / dn if wn > 0 and dn > 0 else 1.0
            buf[i] = momentum * buf[i] + lr * r * d
            ps[i] = p - buf[i]
    return ps


@pytest.mark.parametrize("name", ["lamb", "lars"])
def test_lamb_and_lars_match_the_formula(name):
    from collab_fast.optim import LAMB, LARS

    ps = _params()
    if name == "lamb":
        opt = LAMB([{"params": ps, "weight_decay": 0.01}], lr=0.1, betas=(0.9, 0.99), eps=1e-6)
        want = _lamb_reference(ps, 5, 0.1, 0.9, 0.99, 1e-6, 0.01)
    else:
        opt = LARS([{"params": ps, "weight_decay": 0.05}], lr=0.5, momentum=0.9, eta=0.02)
        want = _lars_reference(ps, 5, 0.5, 0.9, 0.02, 0.05)
    for t in range(5):
        for p, g in zip(ps, _grads(t, ps)):
            p.grad = g
        opt.step()
    for p, w in zip(ps, want):
        torch.testing.assert_close(p.detach(), w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["lamb", "lars"])
def test_lamb_and_lars_equal_timm(name):
    # timm's Lamb with always_adapt (the trust ratio on every tensor, as here) and no global clipping; timm's
    # Lars at a constant LR (here the LR sits in the momentum buffer, there outside: equal while it is constant).
    timm_optim = pytest.importorskip("timm.optim", reason="needs timm (CI: the timm/torchvision stage)")
    from collab_fast.optim import LAMB, LARS

    ours, theirs = _params(), _params()
    if name == "lamb":
        opt = LAMB([{"params": ours, "weight_decay": 0.05}], lr=0.1, betas=(0.9, 0.99), eps=1e-6)
        ref = timm_optim.Lamb(theirs, lr=0.1, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.05, max_grad_norm=None,
                              always_adapt=True)
    else:
        opt = LARS([{"params": ours, "weight_decay": 0.05}], lr=0.5, momentum=0.9, eta=0.02)
        ref = timm_optim.Lars(theirs, lr=0.5, momentum=0.9, weight_decay=0.05, trust_coeff=0.02)
    for t in range(5):
        for a, b, g in zip(ours, theirs, _grads(t, ours)):
            a.grad, b.grad = g.clone(), g.clone()
        opt.step(), ref.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("grad", ["finite", "nan", "inf"])
@pytest.mark.parametrize("name", ["sgd", "adamw", "lamb", "lars"])
def test_every_optimizer_skips_a_step_on_found_inf_without_a_sync(name, grad):
    # A skipped step's gradients are what made it skipped: NaN or inf must leave no trace (x + 0 * NaN is NaN).
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2))
    opt = make_optimizer(model, OptimConfig(optimizer=name, lr=0.05, wd=1e-3))
    x = torch.randn(8, 4)
    scale = {"finite": 1.0, "nan": float("nan"), "inf": float("inf")}[grad]

    def step(found):
        (model(x).square().mean() * (scale if found else 1.0)).backward()
        opt.found_inf = torch.tensor(float(found))
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(0)
    before = ({k: v.clone() for k, v in model.state_dict().items()},
              [{k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for s in opt.state.values()])
    step(1)  # skipped: weights and optimizer state exactly as they were
    for k, v in model.state_dict().items():
        if "running" not in k and "num_batches" not in k:
            assert torch.equal(v, before[0][k]), (name, k)
    for s, old in zip(opt.state.values(), before[1]):
        for k, v in s.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(old[k])), (name, k)
    step(0)  # and a finite step moves them
    assert any(not torch.equal(v, before[0][k]) for k, v in model.state_dict().items() if "weight" in k)


@pytest.mark.parametrize("name", ["sgd", "adamw", "lamb", "lars"])
def test_every_optimizer_survives_a_skipped_first_step(name):
    # The first step is where fp16's scaler most often skips (its initial scale overflows): nothing of it may
    # stay behind. LAMB's bias corrections at step count 0 are 1 - b^0 = 0: its discarded update was 0/0, and
    # NaN x 0 reached the weights.
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    opt = make_optimizer(model, OptimConfig(optimizer=name, lr=0.05, wd=1e-3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(8, 4)
    (model(x).square().mean() * float("inf")).backward()
    opt.found_inf = torch.ones(())
    opt.step()
    opt.zero_grad(set_to_none=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), (name, k)
    model(x).square().mean().backward()
    opt.found_inf = torch.zeros(())
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters()), name
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items()), name


def test_optimizer_choice_and_its_default_learning_rate():
    model = build("resnet32", "single", num_classes=10)
    assert isinstance(make_optimizer(model, OptimConfig(optimizer="adamw", lr=1e-3)), torch.optim.AdamW)
    assert OptimConfig(optimizer="adamw").resolved(cuda=False, world=1).lr == pytest.approx(1e-3)
    assert OptimConfig(optimizer="lars").resolved(cuda=False, world=2).lr == pytest.approx(0.2)
    lars = make_optimizer(model, OptimConfig(optimizer="lars", lr=1.0))
    assert [g["trust"] for g in lars.param_groups] == [True, False]  # no trust ratio for norms and biases
    with pytest.raises(ValueError, match="--opt must be one of sgd, adamw, lamb, lars"):
        OptimConfig(optimizer="adam")


@pytest.mark.parametrize("name", ["sgd", "adamw", "lamb", "lars"])
def test_every_optimizer_takes_the_fp16_scaler_on_the_device(name):
    # Under --amp fp16 the grad scaler hands each optimizer its scale and found_inf (torch's fused optimizers'
    # contract, which LAMB and LARS now follow): the update equals the unscaled one, an inf gradient skips the
    # step and halves the scale, and nothing is read on the host (GradScaler's other path calls .item()).
    from torch.utils._python_dispatch import TorchDispatchMode

    class Reads(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func._schema.name.split("::")[-1])
            return func(*args, **(kwargs or {}))

    def run(scaled: bool, poison: bool = False):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)).double()
        opt = make_optimizer(model, OptimConfig(optimizer=name, lr=0.05, wd=1e-3))
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0) if scaled else None
        reads = Reads()
        for t in range(3):
            x = torch.randn(8, 4, dtype=torch.float64)
            loss = model(x).square().mean() * (float("inf") if poison and t == 1 else 1.0)
            with reads:
                (scaler.scale(loss) if scaled else loss).backward()
                if scaled:
                    scaler.step(opt), scaler.update()
                else:
                    opt.step()
            opt.zero_grad(set_to_none=True)
        return model, scaler, reads.names

    plain, _, _ = run(False)
    scaled, scaler, names = run(True)
    assert getattr(make_optimizer(plain, OptimConfig(optimizer=name, lr=0.1)), "_step_supports_amp_scaling", False)
    for a, b in zip(plain.parameters(), scaled.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)
    assert not {"_local_scalar_dense", "item", "is_nonzero"} & set(names), name
    skipped, scaler, _ = run(True, poison=True)
    assert float(scaler.get_scale()) == 1024.0 * 0.5  # one skip halves the scale (two growth-free steps)
    assert all(torch.isfinite(p).all() for p in skipped.parameters())
