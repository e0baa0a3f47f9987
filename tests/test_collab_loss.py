"""fused_collab_loss: the reference against the paper's formula, the Triton kernel against the reference."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import HAS_CUDA, requires_cuda

from collab_fast import CollabLoss, collab_loss_reference, fused_collab_loss
from collab_fast.kernels import collab_loss as cl

DEV = torch.device("cuda" if HAS_CUDA else "cpu")


def paper_loss(z, y, T, beta, w, detach, eps=0.0, ignore_index=-100, kl=False, weights=None):
    """Eq. 2-4 written head by head with torch.nn.functional, float64: an independent formula.
    kl: the soft term as F.kl_div (KL(q || p)); weights: (hard, soft) factors instead of beta, (1-beta) w.
    y: labels [N], or probabilities [N, C] (F.cross_entropy's probability targets; every row counts)."""
    k_hard, k_soft = weights if weights is not None else (beta, (1 - beta) * w)
    H = z.shape[0]
    valid = torch.ones(y.shape[0], dtype=torch.bool) if y.is_floating_point() else y != ignore_index
    total = 0.0
    for h in range(H):
        hard = F.cross_entropy(z[h][valid], y[valid], reduction="sum", label_smoothing=eps)
        if H == 1:
            total = total + hard
            continue
        others = torch.stack([z[j] for j in range(H) if j != h]).mean(0)
        if detach:
            others = others.detach()
        q = F.softmax(others[valid] / T, -1)
        if kl:
            soft = F.kl_div(F.log_softmax(z[h][valid] / T, -1), F.log_softmax(others[valid] / T, -1),
                            reduction="sum", log_target=True)
        else:
            soft = -(q * F.log_softmax(z[h][valid] / T, -1)).sum()
        total = total + k_hard * hard + k_soft * soft
    return total / valid.sum().clamp(min=1)


def make(H, N, C, dtype=torch.float32, scale=3.0, seed=0, device=DEV):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(H, N, C, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    y = torch.randint(0, C, (N,), generator=g).to(device)
    return z, y


def run_both(z, y, upstream=None, block_c=None, **kw):
    """Reference in float64 and the kernel on z's dtype; returns (ref loss, ker loss, ref grad, ker grad)."""
    z_ref = z.detach().double().requires_grad_()
    z_ker = z.detach().clone().requires_grad_()
    ref = collab_loss_reference(z_ref, y, **kw)
    ker = fused_collab_loss(z_ker, y, impl="triton", block_c=block_c, **kw)
    if upstream is None:
        upstream = torch.rand(ref.shape, dtype=torch.float64, device=z.device) + 0.5
    ref.backward(upstream)
    ker.backward(upstream.float())
    return ref, ker, z_ref.grad, z_ker.grad


def assert_close(ker, ref, atol, rtol=1e-4):
    torch.testing.assert_close(ker.double(), ref.double(), atol=atol, rtol=rtol)


# -------------------------------------------------------------------------- the reference itself


@pytest.mark.parametrize("H", [1, 2, 3, 4])
@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_reference_matches_paper_formula(H, detach, eps):
    z, y = make(H, 9, 13, dtype=torch.float64)
    y[2] = -100
    a = z.clone().requires_grad_()
    b = z.clone().requires_grad_()
    ref = collab_loss_reference(a, y, temperature=3.0, beta=0.3, soft_weight=1.7, detach_consensus=detach,
                                label_smoothing=eps)
    want = paper_loss(b, y, 3.0, 0.3, 1.7, detach, eps)
    torch.testing.assert_close(ref, want)
    ref.backward()
    want.backward()
    torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("H", [2, 3, 4])
@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("weights", [None, (1.0, 2.5)])
def test_reference_kl_and_weights_match_the_formula(H, detach, weights):
    z, y = make(H, 9, 13, dtype=torch.float64)
    y[2] = -100
    a = z.clone().requires_grad_()
    b = z.clone().requires_grad_()
    kw = {"weights": weights} if weights else {"beta": 0.3, "soft_weight": 1.7}
    ref = collab_loss_reference(a, y, temperature=3.0, detach_consensus=detach, soft_loss="kl", **kw)
    want = paper_loss(b, y, 3.0, 0.3, 1.7, detach, kl=True, weights=weights)
    torch.testing.assert_close(ref, want)
    ref.backward()
    want.backward()
    torch.testing.assert_close(a.grad, b.grad)


def test_kl_and_ce_relation():
    # Detached consensus: KL = CE - entropy(q), same gradient. Live consensus: different gradients.
    z, y = make(3, 6, 11, dtype=torch.float64)
    grads = {}
    for soft_loss in ("ce", "kl"):
        for detach in (True, False):
            x = z.clone().requires_grad_()
            loss = collab_loss_reference(x, y, soft_loss=soft_loss, detach_consensus=detach, reduction="none")
            loss.sum().backward()
            grads[soft_loss, detach] = (loss.detach(), x.grad)
    torch.testing.assert_close(grads["ce", True][1], grads["kl", True][1])
    assert (grads["ce", True][0] - grads["kl", True][0]).abs().min() > 1e-3  # the entropy offset
    assert (grads["ce", False][1] - grads["kl", False][1]).abs().max() > 1e-3


def test_weights_replace_beta_and_soft_weight():
    z, y = make(3, 6, 11, dtype=torch.float64)
    a = collab_loss_reference(z, y, beta=0.25, soft_weight=3.0)
    b = collab_loss_reference(z, y, weights=(0.25, 0.75 * 3.0))
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="weights replaces beta and soft_weight"):
        fused_collab_loss(z, y, beta=0.5, weights=(1.0, 1.0))
    for bad, match in [((1.0,), "a pair"), ((1.0, -1.0), r"weights must be in \[0, inf\), got -1.0"),
                       ((float("nan"), 1.0), "weights must be a finite number, got nan"), ("ab", "a pair")]:
        with pytest.raises(ValueError, match=match):
            CollabLoss(weights=bad)
    with pytest.raises(ValueError, match="soft_loss must be one of"):
        CollabLoss(soft_loss="js")


@pytest.mark.parametrize("settings", [dict(beta=0.3, soft_weight=2.0), dict(weights=(1.0, 4.0), soft_loss="kl")])
def test_soft_factor_scales_only_the_soft_objective(settings):
    z, y = make(3, 6, 11, dtype=torch.float64)
    base = CollabLoss(impl="torch", **settings).params
    scaled = base.with_soft_factor(0.25)
    assert scaled.hard_coef == base.hard_coef and scaled.soft_coef == pytest.approx(0.25 * base.soft_coef)
    assert scaled.temperature == base.temperature and scaled.soft_loss == base.soft_loss
    _, stats = cl.collab_loss(z, y, base, return_stats=True)
    got = cl.collab_loss(z, y, scaled)
    want = (base.hard_coef * stats.hard.sum() + 0.25 * base.soft_coef * stats.soft.sum()).to(got.dtype)
    torch.testing.assert_close(got, want)
    assert base.with_soft_factor(0.0).soft_coef == 0.0


def test_reference_single_head_is_cross_entropy():
    z, y = make(1, 6, 7, dtype=torch.float64)
    torch.testing.assert_close(collab_loss_reference(z, y), F.cross_entropy(z[0], y))


def test_detach_modes_differ():
    # A test that can fail: the two gradients must not coincide.
    z, y = make(3, 4, 5, dtype=torch.float64)
    grads = []
    for detach in (True, False):
        x = z.clone().requires_grad_()
        collab_loss_reference(x, y, detach_consensus=detach).backward()
        grads.append(x.grad)
    assert (grads[0] - grads[1]).abs().max() > 1e-3


# -------------------------------------------------------------------------- kernel vs reference


@pytest.mark.parametrize("H", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("C", [2, 10, 1001])
@pytest.mark.parametrize("detach", [True, False])
def test_kernel_matches_reference(H, C, detach):
    z, y = make(H, 5, C)
    y[3] = -100
    ref, ker, gr, gk = run_both(z, y, detach_consensus=detach)
    assert_close(ker, ref, atol=1e-5)
    assert_close(gk, gr, atol=1e-6)


@pytest.mark.parametrize("H, C, block_c", [(2, 7, None), (3, 37, 16), (4, 1000, None), (5, 130, 32)])
@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("weights", [None, (1.0, 0.7)])
@pytest.mark.parametrize("eps, reduction", [(0.0, "mean"), (0.1, "sum"), (0.0, "none")])
def test_kernel_kl_every_switch_matches_reference(H, C, block_c, detach, weights, eps, reduction):
    # soft_loss="kl" x consensus x free weights x label smoothing x ignore_index x reduction x looped
    # blocks, against the float64 reference: the loss and every head's gradient, non-contiguous logits.
    z, y = make(H, 6, C, seed=C)
    z = z.transpose(0, 1).contiguous().transpose(0, 1)  # [H, N, C] view with non-standard strides
    y[1] = -100
    kw = {"weights": weights} if weights else {"beta": 0.4}
    ref, ker, gr, gk = run_both(z, y, block_c=block_c, soft_loss="kl", detach_consensus=detach,
                                label_smoothing=eps, reduction=reduction, **kw)
    assert_close(ker, ref, atol=2e-5)
    assert_close(gk, gr, atol=2e-6)
    _, stats = fused_collab_loss(z, y, impl="triton", soft_loss="kl", detach_consensus=detach,
                                 label_smoothing=eps, return_stats=True, **kw)
    _, want = collab_loss_reference(z.double(), y, soft_loss="kl", detach_consensus=detach, label_smoothing=eps,
                                    return_stats=True, **kw)
    assert_close(stats.soft, want.soft, atol=2e-5)


@pytest.mark.parametrize("N", [1, 7])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_kernel_reductions_and_upstream_gradient(N, reduction):
    z, y = make(4, N, 1000, seed=N)
    ref, ker, gr, gk = run_both(z, y, reduction=reduction, detach_consensus=False)
    assert ker.shape == ref.shape
    assert_close(ker, ref, atol=1e-4)
    assert_close(gk, gr, atol=1e-6)


@pytest.mark.parametrize("H", [1, 3, 4])
@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("T", [2.0, 3.5])
def test_kernel_looped_path(H, detach, T):
    # C larger than the block: the online max/sum path over several column blocks.
    z, y = make(H, 6, 70, seed=H)
    y[0] = -100
    for reduction in ("mean", "none"):
        ref, ker, gr, gk = run_both(z, y, temperature=T, detach_consensus=detach, reduction=reduction,
                                    block_c=16, label_smoothing=0.05)
        assert_close(ker, ref, atol=1e-5)
        assert_close(gk, gr, atol=1e-6)


@pytest.mark.parametrize("kw", [
    dict(soft_weight=1.0),
    dict(beta=0.0),
    dict(beta=1.0),
    dict(temperature=1.0),
    dict(temperature=5.0, soft_weight=0.3),
    dict(label_smoothing=0.1),
    dict(label_smoothing=0.1, detach_consensus=False, reduction="sum"),
    dict(ignore_index=3),
])
def test_kernel_options(kw):
    z, y = make(3, 8, 33, seed=5)
    y[1] = 3  # ignored when ignore_index == 3
    y[4] = -100 if "ignore_index" not in kw else 1
    ref, ker, gr, gk = run_both(z, y, **kw)
    assert_close(ker, ref, atol=1e-5)
    assert_close(gk, gr, atol=1e-6)


def test_kernel_fp16_input():
    z, y = make(4, 7, 1001, dtype=torch.float16)
    ref, ker, gr, gk = run_both(z, y, detach_consensus=False)
    assert gk.dtype == torch.float16
    assert ker.dtype == torch.float32
    assert_close(ker, ref, atol=1e-4)
    assert_close(gk, gr, atol=2e-5, rtol=2e-3)


def test_all_ignored_gives_zero_not_nan():
    z, y = make(3, 4, 10)
    y[:] = -100
    for reduction in ("mean", "sum", "none"):
        ref, ker, gr, gk = run_both(z, y, reduction=reduction)
        assert torch.isfinite(ker).all() and (ker == 0).all()
        assert (gk == 0).all()
        assert (gr == 0).all()


def test_non_contiguous_inputs():
    # [N, H, C] permuted to [H, N, C], and every other column of a wider tensor.
    base, _ = make(5, 4, 40, seed=2)  # read as [N=5, H=4, 40]
    z = base.permute(1, 0, 2)[:, :, ::2]
    assert not z.is_contiguous() and z.shape == (4, 5, 20)
    y = torch.tensor([0, 19, 3, -100, 7], device=DEV)
    ref, ker, gr, gk = run_both(z, y, detach_consensus=False)
    assert_close(ker, ref, atol=1e-5)
    assert_close(gk, gr, atol=1e-6)
    y2 = torch.randint(0, 5, (9,))[::3].to(DEV)  # strided target
    z2, _ = make(2, 3, 5)
    ref, ker, gr, gk = run_both(z2, y2)
    assert_close(ker, ref, atol=1e-5)
    assert_close(gk, gr, atol=1e-6)


def test_list_input_gradients_reach_every_head():
    z, y = make(3, 6, 12)
    heads = [z[h].clone().requires_grad_() for h in range(3)]
    fused_collab_loss(heads, y, impl="triton", detach_consensus=False).backward()
    zr = z.double().requires_grad_()
    collab_loss_reference(zr, y, detach_consensus=False).backward()
    for h in range(3):
        assert_close(heads[h].grad, zr.grad[h], atol=1e-6)


def test_large_and_masked_logits():
    H, N, C, masked = 4, 6, 40, [0, 7, 8, 39]
    keep = [c for c in range(C) if c not in masked]
    z, _ = make(H, N, C, scale=1e4)
    z[:, :, masked] = float("-inf")
    g = torch.Generator().manual_seed(3)
    y = torch.tensor(keep, device=DEV)[torch.randint(0, len(keep), (N,), generator=g).to(DEV)]
    y_small = torch.searchsorted(torch.tensor(keep, device=DEV), y)  # labels in the reduced class set
    for detach in (True, False):
        for eps in (0.0, 0.1):
            for impl in ("triton", "torch"):
                for block_c in (None, 16):
                    x = z.clone().requires_grad_()
                    kw = dict(detach_consensus=detach, label_smoothing=eps)
                    loss = fused_collab_loss(x, y, impl=impl, block_c=block_c if impl == "triton" else None, **kw)
                    loss.backward()
                    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
                    assert (x.grad[:, :, masked] == 0).all()
                    xs = z[:, :, keep].double().requires_grad_()
                    want = collab_loss_reference(xs, y_small, **kw)
                    want.backward()
                    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-2)
                    torch.testing.assert_close(x.grad[:, :, keep].double(), xs.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("block_c", [None, 16])
def test_stats_match_reference(block_c):
    z, y = make(4, 9, 50, seed=4)
    z[1, 2, :] = 0.0  # ties: argmax takes the first index
    y[5] = -100
    loss, st = fused_collab_loss(z, y, impl="triton", return_stats=True, block_c=block_c)
    ref, rs = collab_loss_reference(z.double(), y, return_stats=True)
    assert_close(loss, ref, atol=1e-5)
    for name in ("hard", "soft", "correct", "num_valid"):
        assert_close(getattr(st, name), getattr(rs, name), atol=1e-5)
    assert st.num_valid.item() == 8


def test_out_of_range_label_in_kernel_gives_nan():
    # The device-side check (what CUDA tensors get without a host sync).
    z, y = make(2, 4, 6)
    y[2] = 6
    loss, _, _, _ = cl.launch.launch(z, y, cl.CollabLossParams())
    assert torch.isnan(loss)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_inplace_writes_gradient_into_logits(reduction):
    z, y = make(3, 5, 20)
    # upstream weights other than 1, on the logits' device
    up = torch.rand(3, 5, device=DEV) + 0.5 if reduction == "none" else torch.tensor(1.7, device=DEV)
    x = z.clone().requires_grad_()
    fused_collab_loss(x, y, impl="triton", reduction=reduction).backward(up)
    leaf = z.clone().requires_grad_()
    work = leaf * 1.0  # a non-leaf whose storage may be reused
    loss = fused_collab_loss(work, y, impl="triton", inplace=True, reduction=reduction)
    assert torch.equal(work.detach(), z)  # forward only reads: the logits are intact until backward
    loss.backward(up)
    assert_close(leaf.grad, x.grad, atol=1e-7)
    assert_close(work.detach(), x.grad, atol=1e-7)  # the logits now hold the gradient


def test_inplace_backward_makes_other_users_of_the_logits_refuse():
    z, y = make(2, 4, 9)
    work = z.clone().requires_grad_() * 1.0
    other = (work.exp()).sum()  # exp saves its output, not work; sin saves its input
    saved = work.sin().sum()
    loss = fused_collab_loss(work, y, impl="triton", inplace=True)
    (loss + other).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.backward()


def test_backward_twice_gives_the_same_gradient():
    # the gradient is computed in backward from the saved logits: retain_graph works like any torch op
    z, y = make(2, 3, 4)
    x = z.clone().requires_grad_()
    loss = fused_collab_loss(x, y, impl="triton", detach_consensus=False)
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    loss.backward()
    assert_close(x.grad, 2 * first, atol=1e-7)


class _CountOps(torch.utils._python_dispatch.TorchDispatchMode):
    """ATen ops that would launch a GPU kernel, allocations, and host syncs (values read back)."""

    VIEWS = {"view", "_unsafe_view", "expand", "as_strided", "alias", "detach", "slice", "select", "unbind", "empty",
             "empty_strided", "empty_like", "new_empty", "new_empty_strided", "t", "unsqueeze", "squeeze"}

    def __init__(self):
        super().__init__()
        self.kernels, self.allocations, self.syncs, self.paused = [], 0, 0, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if self.paused:  # inside a launch: the interpreter's own copies, not the call's ops
            return out
        if name not in self.VIEWS:
            self.kernels.append(name)
        self.syncs += name in ("_local_scalar_dense", "item", "nonzero", "is_nonzero", "equal")
        ins = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (list, tuple)) else [out]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() and t.untyped_storage().data_ptr() not in ins:
                self.allocations += 1
        return out


@pytest.mark.parametrize("kw", [dict(), dict(return_stats=True), dict(reduction="sum"), dict(reduction="none"),
                                dict(block_c=16)])
def test_one_call_is_two_kernels_without_a_sync(monkeypatch, kw):
    # A fwd+bwd launches the two Triton kernels and nothing else: n_valid, the mean, grad_output's scaling and
    # the zeroing of the sums happen in the kernels (#35: at most 4 kernels a call, no host sync).
    monkeypatch.setattr(cl.api, "labels_checked_on_host", lambda t: False)  # as on CUDA: checked in the kernel
    ws = torch.zeros(3 * 3 + 3, device=DEV)  # as on CUDA: one workspace for the stream, left zeroed by each call
    monkeypatch.setattr(cl.launch, "workspace", lambda h, device: ws)
    launches, count = [], _CountOps()

    def launch(*a):
        launches.append(a[2])
        count.paused = True
        real(*a)
        count.paused = False

    real = cl.launch.kernel_launcher
    monkeypatch.setattr(cl.launch, "kernel_launcher", launch)
    z, y = make(3, 8, 40)
    y[2] = -100
    x = z.clone().requires_grad_()
    stats = kw.pop("return_stats", False)
    g = torch.randn(3, 8) if kw.get("reduction") == "none" else torch.tensor(2.5)
    out = fused_collab_loss(x, y, impl="triton", return_stats=stats, **kw)  # compile outside the count
    (out[0] if stats else out).backward(g)
    launches.clear()
    x.grad = None
    with count as c:
        out = fused_collab_loss(x, y, impl="triton", return_stats=stats, **kw)
        (out[0] if stats else out).backward(g)
    assert c.kernels == [], c.kernels
    assert len(launches) == 2 and c.syncs == 0
    assert c.allocations <= 4, c.allocations  # loss, stats (n_valid), gradient (+ row statistics of long rows)
    assert not ws.any()  # the last program left the workspace zeroed for the next call
    if stats:
        ref_stats = collab_loss_reference(z.double(), y, return_stats=True, **{k: v for k, v in kw.items()
                                                                              if k != "block_c"})[1]
        for a, b in zip(out[1], ref_stats):
            assert_close(a, b, atol=1e-5)
    ref = z.double().requires_grad_()
    lr = collab_loss_reference(ref, y, **{k: v for k, v in kw.items() if k != "block_c"})
    (lr * g.double()).sum().backward()
    assert_close(x.grad, ref.grad, atol=1e-6)
    assert_close((out[0] if stats else out).detach(), lr.detach(), atol=1e-5)  # the second call's sums restarted


def test_stats_modified_in_place_change_no_gradient():
    # backward's n_valid lives in a row of forward's buffer that the returned stats do not show
    z, y = make(3, 8, 40)
    y[1] = -100
    x = z.clone().requires_grad_()
    loss, st = fused_collab_loss(x, y, impl="triton", return_stats=True)
    assert st.num_valid.item() == 7
    st.num_valid.zero_()
    st.hard.mul_(0)
    loss.backward(torch.tensor(1.5))
    ref = z.double().requires_grad_()
    (1.5 * collab_loss_reference(ref, y)).backward()
    assert_close(x.grad, ref.grad, atol=1e-6)


def test_forward_keeps_no_gradient_buffer():
    # the forward launch computes no gradient: nothing of [H, N, C] is held until backward
    z, y = make(2, 64, 300)
    x = z.clone().requires_grad_()
    calls = []
    real = cl.launch.launch
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cl.autograd, "launch", lambda *a, **k: calls.append(k.get("compute_grad", False)) or real(*a, **k))
        loss = fused_collab_loss(x, y, impl="triton")
        assert calls == [False]
        loss.backward(torch.tensor(3.0))
        assert calls == [False, True]
    ref = z.double().requires_grad_()
    (3.0 * collab_loss_reference(ref, y)).backward()
    assert_close(x.grad.double(), ref.grad, atol=1e-6)


@pytest.mark.parametrize("soft_loss", ["ce", "kl"])
@pytest.mark.parametrize("detach", [True, False])
def test_gradient_penalty_is_right_or_refused(soft_loss, detach):
    # A gradient penalty needs the gradient's own gradient: the reference path computes it (checked
    # against the independent float64 formula), the Triton path refuses with a clear error.
    z, y = make(3, 4, 6, dtype=torch.float64)

    def penalty(fn):
        x = z.clone().requires_grad_()
        (g,) = torch.autograd.grad(fn(x), x, create_graph=True)
        (gg,) = torch.autograd.grad(g.square().sum(), x)
        return gg

    got = penalty(lambda x: fused_collab_loss(x, y, impl="torch", soft_loss=soft_loss, detach_consensus=detach))
    want = penalty(lambda x: paper_loss(x, y, 2.0, 0.5, 4.0, detach, kl=soft_loss == "kl"))
    torch.testing.assert_close(got, want)
    assert got.abs().sum() > 0
    for reduction in ("mean", "none"):
        x = z.float().clone().requires_grad_()
        loss = fused_collab_loss(x, y, impl="triton", soft_loss=soft_loss, detach_consensus=detach,
                                 reduction=reduction).sum()
        with pytest.raises(RuntimeError, match="double backward .* use impl='torch'"):
            torch.autograd.grad(loss, x, create_graph=True)


def test_no_grad_forward_matches():
    z, y = make(4, 5, 30)
    with torch.no_grad():
        a = fused_collab_loss(z, y, impl="triton")
    assert_close(a, collab_loss_reference(z.double(), y), atol=1e-5)


def test_module_and_auto():
    z, y = make(3, 5, 11)
    mod = CollabLoss(temperature=3.0, beta=0.7, impl="auto")
    assert "temperature=3.0" in repr(mod)
    want = collab_loss_reference(z.double(), y, temperature=3.0, beta=0.7)
    assert_close(mod(z, y), want, atol=1e-5)
    loss, st = mod(z, y, return_stats=True)
    assert st.hard.shape == (3,)


def test_vector_width_only_where_rows_are_aligned():
    z = torch.zeros(4, 8, 1000)
    assert cl.launch.vector_width(z, z) == 4
    assert cl.launch.vector_width(z.bfloat16(), z.bfloat16()) == 8
    assert cl.launch.vector_width(z[:, :, 1:999], z[:, :, 1:999]) == 1  # storage offset: rows not 16-byte aligned
    wide = torch.zeros(4, 8, 1004)
    assert cl.launch.vector_width(wide[:, :, :1000], z) == 4  # row stride 1004: still aligned
    assert cl.launch.vector_width(torch.zeros(4, 8, 1001)[:, :, :1000], z) == 1  # row stride 1001
    assert cl.launch.vector_width(z.transpose(0, 2).contiguous().transpose(0, 2), z) == 1  # class stride != 1


@pytest.mark.parametrize("offset, width", [(0, 1000), (1, 1000), (0, 1001), (4, 996)])
def test_kernel_on_aligned_and_unaligned_views(offset, width):
    # The vector path (aligned rows) and the scalar path (offset storage, odd widths) give the same numbers.
    base, y = make(3, 5, 1004 + 8)
    z = base[:, :, offset : offset + width]
    y = y.clamp(max=width - 1)
    ref, ker, gr, gk = run_both(z, y, detach_consensus=False)
    assert_close(ker, ref, atol=1e-5)
    assert_close(gk, gr, atol=1e-6)


def test_empty_batch():
    z = torch.zeros(2, 0, 5, device=DEV, requires_grad=True)
    y = torch.zeros(0, dtype=torch.long, device=DEV)
    loss = fused_collab_loss(z, y, impl="triton")
    loss.backward()
    assert loss.item() == 0 and z.grad.shape == z.shape


# -------------------------------------------------------------------------- torch.compile / custom op


@pytest.mark.parametrize("reduction, block_c", [("mean", 16), ("none", 64)])  # 16 < C: several blocks a row
def test_custom_op_opcheck(reduction, block_c):
    # Every util of opcheck (schema, autograd registration, FakeTensor, AOTAutograd static and dynamic) on
    # both ops; the gradient op is not differentiable, so its inputs do not require grad.
    z, y = make(2, 3, 37)
    params = (2.0, 0.5, 2.0, True, -100, 0.0, reduction, block_c, "kl")
    torch.library.opcheck(torch.ops.collab_fast.collab_loss_forward,
                          (z.clone().requires_grad_(), y, *params, True, True))
    torch.library.opcheck(torch.ops.collab_fast.collab_loss_forward, (z[:, :, ::2], y.clamp(max=18), *params, False, False))
    _, _, rs = torch.ops.collab_fast.collab_loss_forward(z, y, *params, True, False)
    r = torch.rand(2, 3, device=DEV)
    torch.library.opcheck(torch.ops.collab_fast.collab_loss_backward_rows, (z, y, r, rs, *params))


# -------------------------------------------------------------------------- soft_factor: the ramp read on the device


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("H, C, block_c", [(2, 11, None), (3, 37, 16), (4, 40, 16)])  # 16 < C: looped rows
@pytest.mark.parametrize("detach, soft_loss, reduction", [(True, "ce", "mean"), (False, "kl", "none"),
                                                           (False, "ce", "sum")])
def test_soft_factor_tensor_equals_the_scaled_settings(impl, H, C, block_c, detach, soft_loss, reduction):
    # the factor as a device tensor gives the loss and gradient of the settings scaled on the host, both
    # against the float64 reference; an upstream gradient other than 1; non-contiguous logits
    z, y = make(H, 6, C, seed=C)
    z = z.transpose(1, 2).contiguous().transpose(1, 2) if H == 3 else z
    f = torch.tensor(0.3, device=DEV)
    base = CollabLoss(soft_loss=soft_loss, detach_consensus=detach, reduction=reduction, impl=impl,
                      block_c=block_c).params
    z_ref = z.detach().double().requires_grad_()
    ref = cl.reference.reference(z_ref, y, base.with_soft_factor(0.3))
    z_ker = z.detach().clone().requires_grad_()
    got = cl.collab_loss(z_ker, y, base, soft_factor=f)
    up = torch.rand(ref.shape, dtype=torch.float64, device=DEV) + 0.5
    ref.backward(up)
    got.backward(up.to(got.dtype))
    assert_close(got, ref, atol=1e-5)
    assert_close(z_ker.grad, z_ref.grad, atol=1e-6)
    # and it is a factor: 0 leaves the hard objective alone
    zero = cl.collab_loss(z, y, base, soft_factor=torch.zeros((1,), device=DEV))
    assert_close(zero, cl.reference.reference(z.double(), y, base.with_soft_factor(0.0)), atol=1e-5)


def test_soft_factor_changed_before_backward_is_refused():
    z, y = make(3, 4, 9)
    f = torch.tensor(0.5, device=DEV)
    loss = fused_collab_loss(z.clone().requires_grad_(), y, impl="triton", soft_factor=f)
    f.fill_(0.7)  # backward would read another factor than forward did
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("value, exc, match", [
    (0.5, TypeError, "one-element float tensor on the logits' device"),
    (torch.ones(2), ValueError, "one-element float tensor, got torch.float32 of shape \\(2,\\)"),
    (torch.ones((), dtype=torch.int64), ValueError, "one-element float tensor, got torch.int64"),
    (torch.ones((), requires_grad=True), ValueError, "soft_factor.detach"),
    (torch.tensor(-0.5), ValueError, "finite and >= 0, got -0.5"),
    (torch.tensor(float("nan")), ValueError, "finite and >= 0, got nan"),
])
def test_bad_soft_factor(value, exc, match):
    z, y = make(2, 3, 5, device="cpu")
    with pytest.raises(exc, match=match):
        fused_collab_loss(z, y, soft_factor=value)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_soft_factor_changes_without_recompiling(impl):
    # A ramp through a Python float recompiles at every new value (Dynamo guards on it); read from a tensor,
    # 5 values run one graph. The same values as eager, with gradients.
    from torch._dynamo.testing import CompileCounterWithBackend

    z, y = make(3, 4, 37)
    lin = torch.nn.Linear(37, 37, device=DEV)
    f = torch.zeros((), device=DEV)

    def step(x, t):
        return fused_collab_loss(lin(x), t, impl=impl, block_c=16, soft_factor=f)

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    for v in (0.0, 0.1, 0.5, 0.9, 1.0):
        f.fill_(v)
        _compiled_equals_eager(compiled, step, z, y)
    assert counter.frame_count == 1


@pytest.mark.parametrize("soft_factor", [None, 0.25])
def test_custom_op_opcheck_with_soft_factor(soft_factor):
    z, y = make(2, 3, 37)
    f = None if soft_factor is None else torch.tensor(soft_factor, device=DEV)
    params = (2.0, 0.5, 2.0, False, -100, 0.0, "mean", 16, "ce")
    torch.library.opcheck(torch.ops.collab_fast.collab_loss_forward,
                          (z.clone().requires_grad_(), y, *params, True, True, f))
    _, _, rs = torch.ops.collab_fast.collab_loss_forward(z, y, *params, True, False, f)
    torch.library.opcheck(torch.ops.collab_fast.collab_loss_backward_rows,
                          (z, y, torch.rand(2, 3, device=DEV), rs, *params, f))


@pytest.mark.slow
def test_under_torch_compile():
    z, y = make(3, 4, 9)
    lin = torch.nn.Linear(9, 9, dtype=torch.float32, device=DEV)

    def step(x, t):
        return fused_collab_loss(lin(x), t, impl="triton", detach_consensus=False)

    _compiled_equals_eager(torch.compile(step, fullgraph=True), step, z, y)


@pytest.mark.slow
def test_probability_targets_under_torch_compile():
    # the custom op's fake implementation with [N, C] targets: rows longer than one block keep 9 statistics
    z, _ = make(3, 4, 40)
    t = torch.softmax(torch.randn(4, 40, device=DEV), -1)
    lin = torch.nn.Linear(40, 40, dtype=torch.float32, device=DEV)

    def step(x, t):
        return fused_collab_loss(lin(x), t, impl="triton", block_c=16, label_smoothing=0.1)

    _compiled_equals_eager(torch.compile(step, fullgraph=True), step, z, t)


def _compiled_equals_eager(compiled, step, z, y):
    x1, x2 = z.clone().requires_grad_(), z.clone().requires_grad_()
    out_c = compiled(x1, y)
    out_c.backward()
    out_e = step(x2, y)
    out_e.backward()
    assert_close(out_c, out_e, atol=1e-6)
    assert_close(x1.grad, x2.grad, atol=1e-6)


@pytest.mark.slow
def test_under_torch_compile_dynamic_batch():
    # dynamic=True: one graph for every batch size (N symbolic; H and C, which pick the kernel's block,
    # specialised). Rows longer than one block keep their statistics (block_c=16 < C).
    def step(x, t):
        return fused_collab_loss(x, t, impl="triton", block_c=16)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    for n in (5, 7):
        _compiled_equals_eager(compiled, step, *make(2, n, 37, seed=n))


_TRACED = r"""
import json, logging, sys
import torch
from triton.runtime import driver
sys.path.insert(0, BENCHMARKS)
from sass_loss import _Sm90 as Sm90  # enough of a driver for Triton to lower the kernel for an H100
try:
    real = driver.active
except Exception:
    real = None
driver.set_active(Sm90(real))
from torch._dynamo.backends.common import aot_autograd
from collab_fast.kernels import collab_loss as cl

cl.api.check_triton_usable = lambda device: None  # CPU tensors reach the compiled (not interpreted) kernel
launches = []
cl.jit.collab_loss_kernel.run = lambda *a, grid, warmup, **kw: launches.append((grid, a, kw))  # kept, not run
warned = []
handler = logging.Handler()
handler.emit = lambda record: warned.append(record.getMessage())
logging.getLogger("torch._higher_order_ops.triton_kernel_wrap").addHandler(handler)


def summary(grid, args, kw):
    bound = dict(zip(cl.jit.collab_loss_kernel.arg_names, args)) | kw
    row = {k: [str(v.dtype), list(v.shape), list(v.stride())] if isinstance(v, torch.Tensor) else v
           for k, v in bound.items() if k not in ("num_stages", "num_ctas")}  # (Triton's defaults either way)
    return row | {"grid": ([int(g) for g in grid] + [1, 1])[:3]}


out = {}
torch.manual_seed(0)
H, N, C = 3, 8, 37
for case, kw in {"none": dict(reduction="none"),
                 "mean": dict(block_c=16, return_stats=True, soft_loss="kl")}.items():  # 16 < C: row stats
    z = torch.randn(H, N, C, requires_grad=True)
    y = torch.randint(0, C, (N,))
    sf = torch.tensor(0.5)

    def f(z, y):
        loss = cl.fused_collab_loss(z, y, impl="triton", soft_factor=sf, **kw)
        return loss[0].sum() if kw.get("return_stats") else loss.sum()

    graphs = []
    keep = lambda gm, _: graphs.append(gm) or gm
    torch._dynamo.reset()
    launches.clear()
    torch.compile(f, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep), fullgraph=True)(z, y).backward()
    traced = [summary(*c) for c in launches]
    # what the ops launch called directly (their eager bodies), the row weights in the traced layout
    p = cl.CollabLossParams(impl="triton", **{k: v for k, v in kw.items() if k != "return_stats"})
    args = cl.autograd.params_args(p)
    launches.clear()
    _, _, rs = torch.ops.collab_fast.collab_loss_forward(z.detach(), y, *args, True, bool(kw.get("return_stats")), sf)
    r = torch.ones(()).expand(H, N)  # (sum's gradient, or 1 / n_valid: a scalar expanded either way)
    torch.ops.collab_fast.collab_loss_backward_rows(z.detach(), y, r, rs, *args, sf)
    direct = [summary(*c) for c in launches]
    nodes = [(str(n.target), n.kwargs.get("tensors_to_clone")) for gm in graphs for n in gm.graph.nodes
             if n.op == "call_function"]
    out[case] = {"traced": traced, "direct": direct, "nodes": nodes}
out["warned"] = warned
print("RESULT", json.dumps(out))
""".replace("BENCHMARKS", repr(str(Path(__file__).resolve().parent.parent / "benchmarks")))


def test_compiled_graph_launches_the_kernel_itself():
    # With a compiled (not interpreted) kernel the ops are Triton ops: AOTAutograd traces into them, so the
    # graph Inductor gets holds the kernel itself (a triton_kernel_wrapper node it compiles, launches and,
    # in a CUDA graph, captures), not an opaque op. Traced on CPU outside the interpreter (the kernel lowered
    # for sm_90 by Torch's analysis of its stores; its launches recorded, not run). Checked: no opaque op is
    # left; the analysis found exactly the buffers the kernel writes (never the logits, labels, row weights
    # or soft factor: nothing is copied); and the graph launches what the ops' bodies launch when called
    # directly (which the interpreter tests check against the reference): the same grid, warps,
    # constexprs, scalars, and tensors of the same dtype, shape and strides.
    rows = _compile_rows(_TRACED)
    assert not [w for w in rows["warned"] if "assuming every input is mutated" in w], rows["warned"]
    written = {"loss_ptr", "stats_ptr", "ws_ptr", "rs_ptr", "g_ptr"}
    for case in ("none", "mean"):
        nodes, traced, direct = rows[case]["nodes"], rows[case]["traced"], rows[case]["direct"]
        assert not [t for t, _ in nodes if "collab_fast" in t], nodes
        kernels = [clone for t, clone in nodes if t == "triton_kernel_wrapper_functional"]
        assert len(kernels) == 2 and all(set(c) <= written for c in kernels), (case, nodes)
        assert "g_ptr" in kernels[1] and "loss_ptr" in kernels[0], (case, kernels)
        assert len(traced) == len(direct) == 2, case
        for phase, a, b in zip(("forward", "backward"), traced, direct):
            assert a == b, (case, phase, {k: (a.get(k), b.get(k)) for k in a.keys() | b.keys() if a.get(k) != b.get(k)})


# -------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("args, kw, exc, match", [
    ((torch.zeros(4, 5), torch.zeros(4, dtype=torch.long)), {}, ValueError, "logits must be a tensor"),
    (([], torch.zeros(4, dtype=torch.long)), {}, ValueError, "no heads"),
    (([torch.zeros(4, 5), torch.zeros(4, 6)], torch.zeros(4, dtype=torch.long)), {}, ValueError, "same shape"),
    (("abc", torch.zeros(4, dtype=torch.long)), {}, TypeError, "logits must be"),
    ((torch.zeros(0, 4, 5), torch.zeros(4, dtype=torch.long)), {}, ValueError, "no heads"),
    ((torch.zeros(2, 4, 5, dtype=torch.long), torch.zeros(4, dtype=torch.long)), {}, TypeError, "floating-point"),
    ((torch.zeros(2, 4, 5), torch.zeros(3, dtype=torch.long)), {}, ValueError, r"target must have shape \[N\]"),
    ((torch.zeros(2, 4, 5), torch.zeros(4)), {}, TypeError, r"class indices must be an integer tensor \[N\]"),
    ((torch.zeros(2, 4, 5), [0, 1, 2, 3]), {}, TypeError, "target must be an integer tensor"),
    ((torch.zeros(2, 4, 5), torch.tensor([0, 1, 5, 2])), {}, ValueError, r"target\[2\] = 5 is outside \[0, 5\)"),
    ((torch.zeros(2, 4, 5), torch.tensor([0, 1, -1, 2])), {}, ValueError, r"target\[2\] = -1"),
    ((torch.zeros(2, 4, 5), torch.zeros(4, dtype=torch.long)), {"temperature": 0.0}, ValueError, "temperature"),
    ((torch.zeros(2, 4, 5), torch.zeros(4, dtype=torch.long)), {"temperature": float("nan")}, ValueError, "temperature"),
    ((torch.zeros(2, 4, 5), torch.zeros(4, dtype=torch.long)), {"temperature": 1e200}, ValueError,
     r"temperature must be in \(0, 10000\], got 1e\+200"),
    ((torch.zeros(2, 4, 5), torch.zeros(4, dtype=torch.long)), {"beta": 1.5}, ValueError, "beta"),
    ((torch.zeros(2, 4, 5), torch.zeros(4, dtype=torch.long)), {"beta": -0.1}, ValueError, "beta"),
    ((torch.zeros(2, 4, 5), torch.zeros(4, dtype=torch.long)), {"soft_weight": -1.0}, ValueError, "soft_weight"),
    ((torch.zeros(2, 4, 5), torch.zeros(4, dtype=torch.long)), {"label_smoothing": 2.0}, ValueError, "label_smoothing"),
    ((torch.zeros(2, 4, 5), torch.zeros(4, dtype=torch.long)), {"reduction": "avg"}, ValueError, "reduction"),
    ((torch.zeros(2, 4, 5), torch.zeros(4, dtype=torch.long)), {"impl": "cuda"}, ValueError, "impl"),
    ((torch.zeros(2, 4, 5), torch.zeros(4, dtype=torch.long)), {"ignore_index": 1.5}, TypeError, "ignore_index"),
    ((torch.zeros(2, 4, 5), torch.zeros(4, dtype=torch.long)), {"detach_consensus": "yes"}, TypeError,
     "detach_consensus"),
    ((torch.zeros(2, 4, 5, dtype=torch.float64, device=DEV), torch.zeros(4, dtype=torch.long, device=DEV)),
     {"impl": "triton"}, TypeError, "float64"),
    ((torch.zeros(2, 4, 5), torch.zeros(4, dtype=torch.long)), {"impl": "torch", "inplace": True},
     ValueError, "inplace=True needs the Triton kernel"),
    ((torch.zeros(2, 4, 5), torch.zeros(4, dtype=torch.long)), {"impl": "triton", "block_c": 12},
     ValueError, "block_c"),
    ((torch.zeros(2, 4, 5), torch.zeros(4, dtype=torch.long)), {"impl": "triton", "block_c": 2**20},
     ValueError, "block_c"),
    ((torch.zeros(2, 4, 5), torch.zeros(4, dtype=torch.long)), {"ignore_index": 2**70}, ValueError, "ignore_index"),
])
def test_bad_input(args, kw, exc, match):
    with pytest.raises(exc, match=match):
        fused_collab_loss(*args, **kw)


@pytest.mark.parametrize("kw, match", [({"temperature": -1}, "temperature"), ({"beta": 2}, "beta"),
                                       ({"block_c": 2**20}, "block_c"), ({"reduction": "avg"}, "reduction")])
def test_module_validates_at_construction(kw, match):
    with pytest.raises(ValueError, match=match):
        CollabLoss(**kw)


def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    code = ("import torch\nfrom collab_fast import fused_collab_loss\n"
            "fused_collab_loss(torch.zeros(2, 3, 4), torch.zeros(3, dtype=torch.long), impl='triton')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert "TRITON_INTERPRET=1" in res.stderr


def _outside_and_edges(meta):
    """(values just outside the declared range, values on its closed edges) of a setting's `opt` metadata."""
    lo, hi = meta["lo"], meta["hi"]
    outside = [lo if meta["lo_open"] else lo - 0.5 * max(1.0, abs(lo))] if lo is not None else []
    outside += [hi * 2 + 1, float("inf"), float("nan")] if hi is not None else [float("inf"), float("nan")]
    edges = ([] if lo is None or meta["lo_open"] else [lo]) + ([] if hi is None or meta["hi_open"] else [hi])
    return outside, edges


@pytest.mark.parametrize("attr", ["temperature", "beta", "soft_weight", "label_smoothing", "weights"])
def test_one_range_per_setting_whatever_the_entry_point(attr):
    # The library (fused_collab_loss, CollabLoss, CollabLossParams) and the trainer (flags, config files) check
    # a setting with one rule: the same values are refused (naming the argument or the flag), the same accepted.
    from collab_fast.cli import flag
    from collab_fast.config import FLAT, TrainConfig
    from collab_fast.kernels.collab_loss.params import _SPECS

    flat, meta = next((f, m) for a, f, _, _, m in _SPECS if a == attr)
    assert FLAT[flat][1].name == attr
    as_value = (lambda v: (1.0, v)) if attr == "weights" else (lambda v: v)
    z, y = make(2, 4, 5, dtype=torch.float64)
    outside, edges = _outside_and_edges(meta)
    assert outside and (attr in ("soft_weight", "weights") or edges)
    for v in outside:
        for build in (lambda kw: cl.CollabLossParams(**kw), lambda kw: CollabLoss(**kw),
                      lambda kw: fused_collab_loss(z, y, **kw)):
            with pytest.raises(ValueError, match=f"^{attr} must be "):
                build({attr: as_value(v)})
        with pytest.raises(ValueError, match=f"^{flag(flat)} must be "):
            TrainConfig.from_flags("digits", **{flat: list(as_value(v)) if attr == "weights" else v})
    for v in edges:
        lib = cl.CollabLossParams(**{attr: as_value(v)})
        cfg = TrainConfig.from_flags("digits", **{flat: list(as_value(v)) if attr == "weights" else v}).loss
        assert lib == cfg and getattr(lib, attr) == as_value(v)


def test_settings_are_keyword_only_and_typed():
    with pytest.raises(TypeError, match="positional"):
        cl.CollabLossParams(2.0)
    for kw, match in [({"temperature": "2"}, "temperature must be a finite number"),
                      ({"detach_consensus": 1}, "detach_consensus must be True or False"),
                      ({"soft_loss": 3}, "soft_loss must be a string"), ({"weights": (1.0, "a")}, "weights must be")]:
        with pytest.raises(TypeError, match=match):
            cl.CollabLossParams(**kw)
    p = cl.CollabLossParams(temperature=3, beta=0, weights=None)
    assert p.temperature == 3.0 and type(p.temperature) is float and p.soft_weight == 9.0 and p.beta == 0.0


_LAYERS = ["params", "reference", "jit", "launch", "autograd", "api"]  # the loss's modules, lowest first


def _imports(path: Path):
    import ast

    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("collab_fast"):
            yield node.module, [a.name for a in node.names]


def test_the_loss_is_cut_by_layer_and_modules_share_public_names_only():
    root = Path(cl.__file__).parents[2]
    for i, layer in enumerate(_LAYERS):  # a layer imports only layers below it
        for module, _ in _imports(root / "kernels" / "collab_loss" / f"{layer}.py"):
            if module.startswith("collab_fast.kernels.collab_loss."):
                assert _LAYERS.index(module.rsplit(".", 1)[1]) < i, (layer, module)
    for path in sorted(root.rglob("*.py")):  # no module imports another's private names
        for module, names in _imports(path):
            assert not [n for n in names if n.startswith("_")], (path, module)
    linear = {m for m, _ in _imports(root / "kernels" / "fused_linear.py")}
    assert linear and all(m.startswith("collab_fast.kernels.collab_loss.") for m in linear), linear


# -------------------------------------------------------------------------- GPU only


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("C", [1000, 32768])
def test_gpu_bf16(C):
    z, y = make(4, 64, C, dtype=torch.bfloat16, device="cuda")
    ref, ker, gr, gk = run_both(z, y, detach_consensus=False)
    assert gk.dtype == torch.bfloat16
    assert_close(ker, ref, atol=1e-3, rtol=1e-3)
    assert_close(gk, gr, atol=1e-4, rtol=2e-2)


@requires_cuda
@pytest.mark.gpu
def test_gpu_64bit_offsets():
    # H * N * C > 2^31 elements: offsets must not overflow. bf16 keeps it at ~4.3 GB. The last rows (past
    # element 2^31) are compared with the float64 reference: loss and gradient.
    H, N, C = 2, 16400, 65536
    assert H * N * C > 2**31
    z = torch.randn(H, N, C, device="cuda", dtype=torch.bfloat16)
    y = torch.randint(0, C, (N,), device="cuda")
    y[-1] = 7
    z[:, -1, 7] = 30.0  # the last row is confidently right in every head: hard loss ~0, soft loss finite
    z.requires_grad_()
    loss = fused_collab_loss(z, y, reduction="none")
    assert torch.isfinite(loss).all()
    tail = z.detach()[:, -3:].double().requires_grad_()
    want = collab_loss_reference(tail, y[-3:], reduction="none")
    assert_close(loss[:, -3:].double(), want, atol=2e-3, rtol=2e-3)
    hard_last = F.cross_entropy(tail[:, -1], y[-1:].expand(H), reduction="none")
    assert hard_last.max() < 1e-3  # the row is right; what remains of its loss is the soft term
    loss.sum().backward()
    want.sum().backward()
    assert torch.isfinite(z.grad[:, -3:]).all()
    assert_close(z.grad[:, -3:].double(), tail.grad, atol=1e-4, rtol=2e-2)


@requires_cuda
@pytest.mark.gpu
def test_gpu_compiled_inductor():
    z, y = make(4, 32, 1000, device="cuda")
    f = torch.compile(lambda x, t: fused_collab_loss(x, t), fullgraph=True)
    x1, x2 = z.clone().requires_grad_(), z.clone().requires_grad_()
    f(x1, y).backward()
    fused_collab_loss(x2, y).backward()
    assert_close(x1.grad, x2.grad, atol=1e-7)


@requires_cuda
@pytest.mark.gpu
def test_gpu_workspace_kept_per_stream_left_zeroed_and_own_in_a_captured_graph():
    z, y = make(3, 64, 1000, device="cuda")
    y[5] = -100
    ref = collab_loss_reference(z.double(), y, return_stats=True)
    for _ in range(3):  # the same workspace each call: the last program zeroes it
        loss, st = fused_collab_loss(z, y, return_stats=True)
        assert_close(loss, ref[0], atol=1e-5)
        assert_close(st.hard, ref[1].hard, atol=1e-5)
    dev = torch.cuda.current_device()
    key = (dev, torch.cuda.current_stream().cuda_stream, 3)
    assert key in cl.launch.WORKSPACES and not cl.launch.WORKSPACES[key].any()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # another stream: another workspace; then warm-up for the capture
        for _ in range(2):
            fused_collab_loss(z, y)
    torch.cuda.current_stream().wait_stream(side)
    kept = dict(cl.launch.WORKSPACES)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fused_collab_loss(z, y)
    assert cl.launch.WORKSPACES == kept  # the graph keeps its own
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert_close(captured, ref[0], atol=1e-5)
    assert not any(w.any() for w in cl.launch.WORKSPACES.values())


_AOT = r"""
import inspect, json, re, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from collab_fast.kernels import collab_loss as cl
from collab_fast.kernels.collab_loss.jit import collab_loss_kernel as kernel
names = list(inspect.signature(kernel.fn).parameters)
def signature(dt):
    sig = {}
    for n in names:
        if n in ("z_ptr", "g_ptr"): sig[n] = "*" + dt
        elif n == "y_ptr": sig[n] = "*i64"
        elif n.endswith("_ptr"): sig[n] = "*fp32"
        elif n in ("inv_t", "hard_coef", "soft_coef", "eps"): sig[n] = "fp32"
        else: sig[n] = "i32"
    return sig
# what the launcher's specialization gives: 16-byte aligned pointers, a head stride divisible by 16
div16 = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
         if n.endswith("_ptr") or n in ("stride_zh_v", "stride_gh_v")}
variants = [  # (dtype, H, BLOCK_C, NUM_BLOCKS, REDUCE, ROW_WEIGHTS, DETACH, STATS, SMOOTH, T_IS_TWO, KL, VEC,
    #             ROW_STATS); ROW_STATS 1 is a forward (loss only), 2 a backward reading forward's statistics
    ("fp32", 4, 1024, 1, True, False, True, True, False, True, False, 4, 0),    # ImageNet C=1000, one block
    ("bf16", 4, 1024, 1, True, False, True, False, False, True, False, 8, 0),   # the same in bf16
    ("bf16", 4, 2048, 16, True, False, False, False, True, True, False, 8, 0),  # LM-like, looped, live consensus
    ("fp32", 3, 64, 3, False, True, False, False, False, False, False, 1, 0),   # backward, padded heads, scalar
    ("fp32", 1, 1024, 2, True, False, True, False, True, False, False, 4, 0),   # one head
    ("fp32", 4, 1024, 1, True, False, False, True, False, True, True, 4, 0),    # KL through the consensus
    ("bf16", 2, 2048, 8, True, False, False, False, False, False, True, 8, 0),  # KL, looped
    ("bf16", 4, 2048, 16, True, False, False, True, True, True, False, 8, 1),   # LM forward keeping row stats
    ("bf16", 4, 2048, 16, False, True, False, False, True, True, False, 8, 2),  # LM backward from row stats
    ("bf16", 4, 2048, 16, False, True, False, False, True, True, False, 8, 0),  # ... and without them
]
out = []
for dt, H, B, NB, RED, ROW, DET, ST, SM, T2, KL, VEC, RS in variants:
    consts = dict(H=H, H_PAD=triton.next_power_of_2(H), BLOCK_C=B, NUM_BLOCKS=NB, REDUCE=RED, MEAN=RED,
                  COMPUTE_LOSS=not ROW, COMPUTE_GRAD=RS != 1, ROW_WEIGHTS=ROW, DETACH=DET, STATS=ST, SMOOTH=SM,
                  T_IS_TWO=T2, KL=KL, VEC=VEC, ROW_STATS=RS, NUM_STAGES=1, FAST_EXP=True, TAIL=1, PROBS=False,
                  SAFE_BLOCK=cl.launch.safe_block(H, B), SOFT_FACTOR=False,
                  stride_zc=1, stride_gc=1)
    s = dict(signature(dt), **{c: "constexpr" for c in consts})
    attrs = {k: v for k, v in div16.items() if names[k[0]] not in consts}
    k = triton.compile(ASTSource(fn=kernel, signature=s, constexprs=consts, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
    ptx = k.asm["ptx"]
    out.append({"vec": VEC, "row_stats": RS, "grad": RS != 1,
                "vector_loads": len(re.findall(r"ld\.global(?:\.\w+)*\.v[248]", ptx)),
                "vector_stores": len(re.findall(r"st\.global(?:\.\w+)*\.v[248]", ptx)),
                "local": len(re.findall(r"\.local", ptx))})
print("RESULT", json.dumps(out))
"""


_BINDER = r"""
import json, os, re, subprocess, sys, tempfile
import torch, triton
from triton.runtime import driver
from collab_fast.kernels import collab_loss as cl
sys.path.insert(0, BENCHMARKS)
from sass_loss import _Sm90 as Sm90  # enough of a driver for Triton's binder to compile for an H100


compiled = []
run = cl.jit.collab_loss_kernel.run
def compile_only(*args, grid, warmup, **kw):  # the launcher's real call, compiled but not launched
    compiled.append(run(*args, grid=grid, warmup=True, **kw))
cl.jit.collab_loss_kernel.run = compile_only
try:
    real = driver.active
except Exception:
    real = None
driver.set_active(Sm90(real))
cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
out = []
for H, N, C, dt in [(4, 256, 1000, "float32"), (4, 256, 1000, "bfloat16"), (2, 4096, 128256, "bfloat16"),
                    (8, 4096, 32000, "bfloat16")]:
    z = torch.empty(H, N, C, dtype=getattr(torch, dt), device="meta")  # shapes and strides, no memory
    y = torch.empty(N, dtype=torch.int64, device="meta")
    p = cl.CollabLossParams()
    rs = cl.launch.row_stats_buffer(z, y, p)
    compiled.clear()
    cl.launch.launch(z, y, p, return_stats=True, save_row_stats=rs)  # what forward launches
    r, w = torch.empty((), device="meta"), torch.empty(5, H, device="meta")  # grad_output, forward's n_valid
    cl.launch.launch(z, y, p, compute_loss=False, compute_grad=True, row_weights=r, row_stats=rs, counts=w)  # backward
    for phase, k in zip(("forward", "backward"), compiled):
        ptx = k.asm["ptx"]
        row = {"shape": f"H{H} N{N} C{C} {dt}", "phase": phase, "row_stats": rs is not None,
               # 16-byte loads: plain vector loads, or the prefetching loops' 16-byte async copies
               "vector_loads": len(re.findall(r"ld\.global(?:\.\w+)*\.v[248]", ptx))
               + len(re.findall(r"cp\.async\.c[ag]\.shared\.global[^;]*, (?:0x10|16)\b", ptx)),
               "prefetch": len(re.findall(r"cp\.async\.c[ag]", ptx)) > 0,
               "vector_stores": len(re.findall(r"st\.global(?:\.\w+)*\.v[248]", ptx)),
               "ptx_local": len(re.findall(r"\.local", ptx))}
        if os.path.exists(cuobjdump) and "cubin" in k.asm:  # the SASS Triton built: registers, stack, local
            with tempfile.TemporaryDirectory() as d:
                with open(os.path.join(d, "k.cubin"), "wb") as f:
                    f.write(k.asm["cubin"])
                usage = subprocess.run([cuobjdump, "-res-usage", os.path.join(d, "k.cubin")], capture_output=True,
                                       text=True).stdout
            found = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", usage))
            row.update({k.lower(): int(v) for k, v in found.items()})
        out.append(row)
print("RESULT", json.dumps(out))
"""


_BINDER = _BINDER.replace("BENCHMARKS", repr(str(Path(__file__).resolve().parent.parent / "benchmarks")))


def _compile_rows(script: str) -> list[dict]:
    """Runs a compile-for-sm_90 script outside the interpreter; returns the rows it prints after RESULT."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900)
    if res.returncode != 0 and "GPUTarget" in res.stderr and "ImportError" in res.stderr:
        pytest.skip("this Triton has no GPUTarget compile API")
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.split("RESULT", 1)[1])


# Integer arguments equal to 1 are compile-time constants for Triton's binder (never in the interpreter): a
# stride or size of 1 must compile as well as any other. Layouts where the kernel's per-VEC strides are 1:
# one class block of VEC columns (C = VEC), one row (N = 1), and logits computed transposed (N innermost).
_BINDER_ONES = _BINDER.split("cuobjdump = ")[0] + r"""
layouts = {
    "C=VEC fp32": torch.empty(2, 3, 4, device="meta"),
    "N=1 C=VEC": torch.empty(3, 1, 4, device="meta"),
    "N=1 H=1 bf16": torch.empty(1, 1, 8, dtype=torch.bfloat16, device="meta"),
    "N innermost": torch.empty(2, 40, 5, device="meta").transpose(1, 2),
    "C=1": torch.empty(2, 3, 1, device="meta"),
}
out = []
for name, z in layouts.items():
    H, N, C = z.shape
    y = torch.empty(N, dtype=torch.int64, device="meta")
    for p in (cl.CollabLossParams(), cl.CollabLossParams(label_smoothing=0.1, reduction="none")):
        rs = cl.launch.row_stats_buffer(z, y, p)
        cl.launch.launch(z, y, p, return_stats=True, save_row_stats=rs)
        r, w = torch.empty((), device="meta"), torch.empty(5, H, device="meta")
        cl.launch.launch(z, y, p, compute_loss=False, compute_grad=True, row_weights=r, row_stats=rs, counts=w)
        out.append(name)
print("RESULT", json.dumps(out))
"""


# Instructions per logit of the finite path's column loop, fwd / bwd (T = 2, labels, defaults), with ~10%
# over the counts of Triton 3.6, 3.7 and 3.9 (benchmarks/results/sass_loss_sm90_*): a change that puts
# instructions back into the loops fails here.
_SASS_BOUNDS = {
    "H1 C128256 bf16": (9.0, 11.0),
    "H2 C128256 bf16": (11.0, 13.0),
    "H2 C128256 fp32": (10.5, 11.0),
    "H3 C50257 bf16": (23.0, 20.5),  # C odd: rows not 16-byte aligned, groups of columns 128 apart
    "H4 C32000 bf16": (18.0, 16.5),
    "H8 C32000 bf16": (19.0, 18.0),  # blocks of 512 columns: <= 128 registers
    "H8 C50257 bf16": (19.5, 19.0),
}


def _sass_rows(*argv: str) -> list[dict]:
    """benchmarks/sass_loss.py's rows (JSON) in a fresh interpreter, compiled for sm_90 (this one interprets)."""
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "sass_loss.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, str(script), "--json", "-", *argv], env=env, capture_output=True, text=True,
                         timeout=900)
    if res.returncode == 2 and "ships no cuobjdump" in res.stderr:
        pytest.skip(res.stderr.strip())
    if res.returncode != 0 and "GPUTarget" in res.stderr and "ImportError" in res.stderr:
        pytest.skip("this Triton has no GPUTarget compile API")
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout)


@pytest.mark.slow
def test_long_row_loops_instruction_counts_for_sm90():
    # benchmarks/sass_loss.py compiles the launcher's own forward and backward calls for sm_90 (no GPU) and
    # reads each column loop's SASS; the finite path is the smallest loop with exponentials.
    shapes = ["H{}:{}:{}".format(*s.replace("H", "").replace("C", "").split()) for s in _SASS_BOUNDS]
    rows = _sass_rows("--shapes", *shapes)
    assert len(rows) == 2 * len(_SASS_BOUNDS)
    per = {}
    for r in rows:
        fwd_bound, bwd_bound = _SASS_BOUNDS[r["shape"]]
        heads = int(r["shape"].split()[0][1:])
        f = r["finite"]
        # the finite path, and the SAFE loops beside it (rows with absent classes, the last partial block)
        assert r["exp_loops"] >= 2, r
        assert f["per_element"] <= (fwd_bound if r["phase"] == "forward" else bwd_bound), r
        # exponentials a logit: one per head and pass (exp(z - m) = e_t^2 at T = 2), a second for the
        # consensus where H >= 3 (with H = 2 it is the other head's; padded heads compute theirs too); the
        # rest are per group or block
        h_pad = 1 << (heads - 1).bit_length()
        assert f["ex2_per_element"] <= (1.25 if heads <= 2 else 2.5 * h_pad / heads), r
        assert r["loop_local"] == 0 and r.get("local", 0) == 0, r  # no spills in the loops
        assert r.get("stack", 0) <= (8 if heads <= 4 else 16), r  # at most a spilled value outside them
        # <= 128 registers: 4 CTAs of 4 warps an SM; H >= 3 under the launcher's cap, which the defaults keep
        assert r["reg"] <= 128, r
        assert (r["maxnreg"] is not None and r["cap_kept"]) == (heads >= 3), r
        per.setdefault(r["shape"], {})[r["phase"]] = f["per_element"]
    assert per["H2 C128256 bf16"]["forward"] + per["H2 C128256 bf16"]["backward"] <= 30.0, per


@pytest.mark.slow
def test_settings_beyond_the_defaults_fit_128_registers_for_sm90():
    # Stats with KL, label smoothing, T = 3 and a live consensus: the heaviest kernels of each phase (a live
    # consensus in backward; the SAFE loops of rows not 16-byte aligned in forward) exceed 128 registers
    # or spill at the default block (H8 C32000 backward 168, H8 C50257 forward 240, H2 C50257 backward 248
    # uncapped), and run the launcher's fallback blocks instead: <= 128 registers, no local memory in a loop.
    rows = _sass_rows("--shapes", "H2:50257:bf16", "H8:32000:bf16", "H8:50257:bf16", "--stats", "--options", "live",
                      "kl", "smooth", "t3")
    assert len(rows) == 6
    for r in rows:
        assert r["reg"] <= 128, r
        assert r["loop_local"] == 0 and r.get("local", 0) == 0 and r.get("stack", 0) <= 16, r
    assert any(r["fallback"] for r in rows), rows


@pytest.mark.slow
def test_launcher_compiles_strides_and_sizes_of_one():
    assert len(_compile_rows(_BINDER_ONES)) == 10


@pytest.mark.slow
def test_launcher_compiles_for_sm90_through_tritons_binder():
    # The launcher's own calls (its strides, vector width, constexprs, row statistics) for the four
    # shapes, specialized by Triton's launch-time binder for an H100 and compiled, not launched: no GPU needed.
    rows = _compile_rows(_BINDER)
    assert len(rows) == 8
    for r in rows:
        # H8 at LM vocabularies: the 4-warp [8, 1024] tile (64 values a thread) spills a little (forward: a
        # 152-byte stack under Triton 3.7; backward: an 8-byte stack under 3.9) and is still the fastest
        # configuration measured on an H200 (Triton 3.6): 5.5 ms fwd+bwd against 10.1 ms with 8 warps and
        # 22.7 ms with 16 (benchmarks/results/bench_loss_sweep_nvidia-h200_2026-12-04.md). Every other row: none.
        spill = 256 if r["shape"].startswith("H8") else 0
        assert r["vector_loads"] > 0, r  # aligned rows: 16-byte loads
        assert r["ptx_local"] == 0 or spill, r  # no local memory
        if "reg" in r:  # spills would be local memory in the SASS
            assert r["stack"] <= spill and r["local"] <= spill and r["reg"] <= 255, r
        if r["phase"] == "forward":
            assert r["vector_stores"] == 0, r  # forward writes no gradient
        else:
            assert r["vector_stores"] > 0, r
    for fwd, bwd in zip(rows[::2], rows[1::2]):
        # one global pass per row and phase: backward has as many tile-load sites as forward (long rows
        # read pass 1's statistics instead of a second pass over the row)
        assert bwd["vector_loads"] == fwd["vector_loads"], (fwd, bwd)
    assert [r["row_stats"] for r in rows[::2]] == [False, False, True, True]
    assert not any(r["prefetch"] for r in rows)  # prefetch is off by default (measured slower on an H200)


@pytest.mark.slow
def test_kernel_compiles_for_sm90_without_a_gpu():
    # The interpreter is lenient; the real compiler (to PTX and SASS for H100) is not, and needs no GPU.
    rows = _compile_rows(_AOT)
    assert len(rows) == 10
    for r in rows:
        assert r["local"] == 0  # no local memory (stack, spills)
        if r["vec"] > 1:  # aligned rows, C = 1000 included: 16-byte vector loads and stores of the tile
            assert r["vector_loads"] > 0 and (r["vector_stores"] > 0 or not r["grad"]), r
        else:
            assert r["vector_loads"] == 0, r
    # Passes over a long row: the backward that reads forward's statistics has one loop of tile loads,
    # the one without them two (pass 1, pass 2): half the load sites; the forward writes no gradient.
    fwd, bwd_stats, bwd_plain = rows[7:]
    assert fwd["vector_stores"] == 0
    assert 0 < bwd_stats["vector_loads"] <= bwd_plain["vector_loads"] // 2, (bwd_stats, bwd_plain)


def test_loop_stages_fit_the_device_shared_memory():
    # H2 fp32 at block 16384: a 128 KB tile. On sm_90 (227 KB) it fits without prefetch (2 tiles do not);
    # on sm_86/89/120 (99 KB) even one tile does not: a one-line error naming block_c and what fits.
    kb = 1024
    assert cl.launch.loop_stages(1, 65536, 2, 2, 227 * kb) == 1  # H1 bf16 65536: one 128 KB tile fits sm_90
    assert cl.launch.loop_stages(2, 2048, 63, 4, 227 * kb) == cl.launch.LOOP_STAGES == 1  # prefetch off by default
    assert cl.launch.loop_stages(2, 2048, 63, 4, 227 * kb, depth=2) == 2  # asked for, and it fits
    assert cl.launch.loop_stages(2, 2048, 1, 4, 227 * kb, depth=2) == 1  # one block per row: nothing to prefetch
    assert cl.launch.loop_stages(2, 16384, 8, 4, 227 * kb, depth=2) == 1  # prefetch buffer would not fit: off
    assert cl.launch.loop_stages(2, 16384, 8, 4, None, depth=2) == 2  # the interpreter / CPU: no limit
    with pytest.raises(ValueError, match=r"block_c=16384 needs about 132 KB .* 99 KB per block: use block_c <= 8192"):
        cl.launch.loop_stages(2, 16384, 8, 4, 99 * kb, user_block=True)
    with pytest.raises(ValueError, match=r"use block_c <= 32768"):
        cl.launch.loop_stages(2, 65536, 2, 2, 227 * kb, user_block=True)  # 256 KB of bf16 over sm_90
    # the default block never trips the check, on any GPU (>= 99 KB), in any dtype, for 1-8 heads
    for heads in range(1, 9):
        for size in (2, 4):
            for c in (10, 1000, 32000, 128256):
                block, blocks, _ = cl.launch.pick_block_c(heads, c)
                assert cl.launch.loop_stages(heads, block, blocks, size, 99 * kb) >= 1


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_small_integer_targets_do_not_wrap(impl):
    # uint8 label 156 wraps to -100 (the default ignore_index) in a uint8 comparison; labels 200/255 with C=300
    # compare wrongly with C in int8: the loss must equal int64 targets'.
    z = torch.randn(2, 4, 300, device=DEV)
    for y in (torch.tensor([156, 3, 200, 255], dtype=torch.uint8, device=DEV),
              torch.tensor([5, 100, 127, 0], dtype=torch.int8, device=DEV),
              torch.tensor([299, 1, 2, 3], dtype=torch.int16, device=DEV)):
        want = fused_collab_loss(z, y.long(), impl=impl)
        assert_close(fused_collab_loss(z, y, impl=impl), want, atol=1e-6)


def test_inplace_refuses_logits_that_share_memory():
    base = torch.randn(1, 3, 10, device=DEV)
    y = torch.randint(0, 10, (3,), device=DEV)
    with pytest.raises(ValueError, match="share memory"):
        fused_collab_loss(base.expand(2, 3, 10).requires_grad_(), y, impl="triton", inplace=True)
    rows = torch.randn(2, 1, 10, device=DEV).expand(2, 3, 10)
    with pytest.raises(ValueError, match="share memory"):
        fused_collab_loss(rows, y, impl="triton", inplace=True)


# -------------------------------------------------------------------------- probability targets [N, C]


def make_probs(N, C, seed=0, device=DEV, kind="mix"):
    """Targets as mixup/cutmix make them: lam * onehot(y1) + (1 - lam) * onehot(y2) ("mix"), or a dense
    random distribution ("dense"), or unnormalised non-negative rows ("free")."""
    g = torch.Generator().manual_seed(seed)
    if kind == "mix":
        y1, y2 = torch.randint(0, C, (N,), generator=g), torch.randint(0, C, (N,), generator=g)
        lam = torch.rand(N, 1, generator=g, dtype=torch.float64)
        t = lam * F.one_hot(y1, C).double() + (1 - lam) * F.one_hot(y2, C).double()
    elif kind == "dense":
        t = torch.softmax(torch.randn(N, C, generator=g, dtype=torch.float64) * 2, -1)
    else:
        t = torch.rand(N, C, generator=g, dtype=torch.float64) * (torch.rand(N, C, generator=g) < 0.3)
    return t.to(device)


@pytest.mark.parametrize("H", [1, 2, 4])
@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_probability_targets_reference_matches_formula(H, detach, eps):
    z, _ = make(H, 6, 9, dtype=torch.float64, device="cpu")
    t = make_probs(6, 9, device="cpu", kind="dense")
    z1, z2 = z.clone().requires_grad_(), z.clone().requires_grad_()
    got = collab_loss_reference(z1, t, temperature=3.0, beta=0.3, detach_consensus=detach, label_smoothing=eps)
    want = paper_loss(z2, t, 3.0, 0.3, 9.0, detach, eps)
    torch.testing.assert_close(got, want)
    got.backward(), want.backward()
    torch.testing.assert_close(z1.grad, z2.grad)


def test_one_hot_probabilities_equal_labels_and_mixup_equals_two_calls():
    # onehot(y) as probabilities is the label loss; lam * onehot(y1) + (1 - lam) * onehot(y2) is
    # lam * loss(y1) + (1 - lam) * loss(y2) for the hard term, what mixup implementations compute with two calls.
    z, y = make(3, 8, 11, dtype=torch.float64, device="cpu")
    torch.testing.assert_close(collab_loss_reference(z, F.one_hot(y, 11).double(), label_smoothing=0.1),
                               collab_loss_reference(z, y, label_smoothing=0.1))
    y2, lam = torch.randint(0, 11, (8,), generator=torch.Generator().manual_seed(1)), 0.3
    t = lam * F.one_hot(y, 11).double() + (1 - lam) * F.one_hot(y2, 11).double()
    hard_only = dict(weights=(1.0, 0.0))
    torch.testing.assert_close(collab_loss_reference(z, t, **hard_only),
                               lam * collab_loss_reference(z, y, **hard_only)
                               + (1 - lam) * collab_loss_reference(z, y2, **hard_only))


@pytest.mark.parametrize("H, C, block_c", [(1, 10, None), (2, 7, None), (3, 37, 16), (4, 1000, None), (5, 130, 32)])
@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("kind", ["mix", "dense", "free"])
@pytest.mark.parametrize("eps, reduction, soft_loss", [(0.0, "mean", "ce"), (0.1, "sum", "kl"), (0.05, "none", "ce")])
def test_kernel_probability_targets_match_reference(H, C, block_c, detach, kind, eps, reduction, soft_loss):
    # Every switch with [N, C] targets, against the float64 reference: loss, gradient (upstream weights other
    # than 1), non-contiguous logits and targets, one-block and looped rows.
    z, _ = make(H, 6, C, seed=C)
    z = z.transpose(0, 1).contiguous().transpose(0, 1)
    t = make_probs(6, C, seed=C, kind=kind).float().t().contiguous().t()  # column-major: class stride N
    ref, ker, gr, gk = run_both(z, t, block_c=block_c, detach_consensus=detach, label_smoothing=eps,
                                reduction=reduction, soft_loss=soft_loss, beta=0.4)
    assert ker.shape == ref.shape
    assert_close(ker, ref, atol=2e-5)
    assert_close(gk, gr, atol=2e-6)
    _, stats = fused_collab_loss(z, t, impl="triton", block_c=block_c, label_smoothing=eps, return_stats=True)
    _, want = collab_loss_reference(z.double(), t, label_smoothing=eps, return_stats=True)
    assert_close(stats.hard, want.hard, atol=2e-5)
    assert_close(stats.soft, want.soft, atol=2e-5)
    assert torch.equal(stats.correct.cpu(), want.correct.cpu()) and float(stats.num_valid) == 6


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_probability_target_dtypes(dtype):
    z, _ = make(2, 5, 40)
    t = make_probs(5, 40).to(dtype)
    ref, ker, gr, gk = run_both(z, t, block_c=16)
    assert_close(ker, ref, atol=1e-4 if dtype == torch.float16 else 2e-5)
    assert_close(gk, gr, atol=1e-5)


def test_probability_targets_stats_and_row_statistics_of_long_rows():
    # rows longer than one block keep the target's sum with pass 1's statistics for backward
    z, _ = make(3, 4, 100)
    t = make_probs(4, 100, kind="free") * 3  # rows sum to about 3x a distribution
    ref, ker, gr, gk = run_both(z, t.float(), block_c=16)
    assert_close(ker, ref, atol=5e-5)
    assert_close(gk, gr, atol=2e-6)
    rs = cl.launch.row_stats_buffer(z, t, cl.CollabLossParams(block_c=16))
    assert rs.shape == (10, 3, 4)


@pytest.mark.parametrize("H", [1, 2, 3, 8])
@pytest.mark.parametrize("kw", [dict(), dict(label_smoothing=0.1, temperature=3.0, reduction="none"),
                                dict(soft_loss="kl", detach_consensus=False), dict(probs=True, return_stats=True),
                                dict(return_stats=True, temperature=0.7, soft_loss="kl")])
def test_long_rows_take_the_finite_path_and_run_again_safe_where_a_class_is_absent(H, kw):
    # Full blocks of a long row are first taken as finite (no absent-class arithmetic), with statistics
    # per group of 4 adjacent columns (fp32 rows 16-byte aligned). Row 1 has absent classes in its second
    # and third blocks, one group wholly: its sums come out NaN or -inf, pass 1 runs the row again with the
    # absent-class arithmetic and flags it, and backward runs the flagged row's blocks the same way.
    # C = 64 = 4 blocks of 16: no partial block, so every block of rows 0, 2, 3, 4 is on the finite path.
    kw = dict(kw)
    probs, stats = kw.pop("probs", False), kw.pop("return_stats", False)
    z, y = make(H, 5, 64, seed=H)
    y[y == 33] = 5  # the label of a sample is never an absent class
    masked = [17, 18, 30, 32, 33, 34, 35]
    z[:, 1, masked] = float("-inf")
    if probs:
        y = make_probs(5, 64, seed=H, kind="dense")
        y[1, masked] = 0.0
        y = y.float()
    ref, ker, gr, gk = run_both(z, y, block_c=16, **kw)
    assert torch.isfinite(ker).all() and torch.isfinite(gk).all()
    assert_close(ker, ref, atol=2e-5)
    assert_close(gk, gr, atol=2e-6)
    assert (gk[:, 1, masked] == 0).all()
    params = cl.CollabLossParams(block_c=16, **kw)
    rs = cl.launch.row_stats_buffer(z, y, params)
    _, st, _, _ = cl.launch.launch(z, y, params, return_stats=stats, save_row_stats=rs)
    if H > 1 or kw.get("label_smoothing"):  # (one head needs it only where a group's maximum is -inf)
        assert rs[8].tolist() == [[0.0, 1.0, 0.0, 0.0, 0.0]] * H  # only row 1 needed the absent-class path
    if stats:
        _, want = collab_loss_reference(z.double(), y, return_stats=True, **kw)
        assert_close(st[0], want.hard, atol=2e-5)
        assert_close(st[1], want.soft, atol=2e-5)
        assert_close(st[2], want.correct, atol=0)
    if H == 1 and not kw.get("label_smoothing"):
        # one head, no smoothing: a group with some absent classes needs nothing else (its maximum is finite)
        z, y = make(H, 5, 64, seed=H)
        z[:, 1, [17, 18, 30]] = float("-inf")
        y[1] = 20
        if probs:
            y = make_probs(5, 64, seed=H, kind="dense")
            y[1, [17, 18, 30]] = 0.0
            y = y.float()
        ref, ker, gr, gk = run_both(z, y, block_c=16, **kw)
        assert_close(ker, ref, atol=2e-5)
        assert_close(gk, gr, atol=2e-6)
        rs = cl.launch.row_stats_buffer(z, y, params)
        cl.launch.launch(z, y, params, save_row_stats=rs)
        assert rs[8].tolist() == [[0.0] * 5]


@pytest.mark.parametrize("H, block_c, C, vec, safe, tail", [
    (8, 256, 845, 1, 128, 1),  # fp32 rows not 16-byte aligned: a thread's group is 2 columns 128 apart
    (8, 256, 968, 4, 128, 2),  # aligned: groups of 4 adjacent columns; SAFE blocks of 128, a tail of 2
    (3, 512, 1324, 4, 256, 2),
    (3, 512, 1325, 1, 256, 2),  # not aligned: 4 columns a group, 128 apart
    (2, 256, 781, 1, 256, 1),  # the two-head swap on strided groups
    (1, 256, 781, 1, 256, 1),
])
@pytest.mark.parametrize("kw", [dict(return_stats=True),
                                dict(label_smoothing=0.1, soft_loss="kl", detach_consensus=False, temperature=3.0),
                                dict(probs=True, return_stats=True, label_smoothing=0.05)])
def test_long_rows_in_narrow_safe_blocks_and_strided_groups(H, block_c, C, vec, safe, tail, kw):
    # Blocks wide enough for the launcher's real layouts: the SAFE loops (a row with -inf in a full block,
    # the partial last block) run over blocks of _safe_block columns, several to a block; rows that are
    # not 16-byte aligned keep per-thread statistics over columns 128 apart. Row 1 holds -inf in its second
    # block (run again SAFE, in narrow blocks); row 2's maximum is tied at two columns of one strided group
    # (the first counts for the stats, as torch.argmax); row 3's lies in the second column of its group;
    # row 4 is ignored.
    _check_long_rows(H, block_c, C, vec, safe, tail, kw)


@pytest.mark.parametrize("H, block_c, C, vec, safe, tail", [
    (8, 256, 845, 1, 32, 3),  # 8 heads: SAFE blocks of 32 columns, fewer than a block's 128 lanes
    (8, 256, 968, 4, 32, 7),
    (4, 512, 1325, 1, 64, 5),
    (2, 256, 781, 1, 128, 1),
])
@pytest.mark.parametrize("kw", [dict(return_stats=True),
                                dict(label_smoothing=0.1, soft_loss="kl", detach_consensus=False, temperature=3.0),
                                dict(probs=True, return_stats=True, label_smoothing=0.05)])
def test_long_rows_in_the_fallback_blocks_of_a_register_fit(monkeypatch, H, block_c, C, vec, safe, tail, kw):
    # The SAFE tile the launcher falls back to where a setting does not fit 128 registers (FIT_SAFE_TILE),
    # exact as the default's: the same rows as above.
    monkeypatch.setattr(cl.launch, "SAFE_TILE", cl.launch.FIT_SAFE_TILE)
    cl.launch.plan.cache_clear()
    try:
        _check_long_rows(H, block_c, C, vec, safe, tail, kw)
    finally:
        cl.launch.plan.cache_clear()


def test_the_plan_offers_a_looped_row_smaller_blocks_to_fit_128_registers(monkeypatch):
    # On a GPU (fast_exp) a looped row of 1-8 heads gets a register budget of 128 and two fallbacks: the SAFE
    # loops' tile at FIT_SAFE_TILE, then the block halved as well; each covers the row exactly (its full
    # blocks and the SAFE blocks of its tail end within one SAFE block past C). A block the caller chose,
    # a row of one block and more than 8 heads get none.
    monkeypatch.setattr(cl.launch, "fast_exp", lambda: True)
    cl.launch.plan.cache_clear()
    try:
        plan = cl.launch.plan
        # C = 50257: 98 blocks of 512 and 81 columns (one SAFE block of 128, three of 32)
        assert plan(8, 50257, None, 2, None)[1:] == (512, 99, 4, 1, 1, 128, 128, (128, (
            (("BLOCK_C", 512), ("NUM_BLOCKS", 99), ("TAIL", 3), ("SAFE_BLOCK", 32)),
            (("BLOCK_C", 256), ("NUM_BLOCKS", 197), ("TAIL", 3), ("SAFE_BLOCK", 32)))))
        assert plan(2, 128256, None, 2, None)[7:] == (None, (128, (
            (("BLOCK_C", 2048), ("NUM_BLOCKS", 63), ("TAIL", 10), ("SAFE_BLOCK", 128)),
            (("BLOCK_C", 1024), ("NUM_BLOCKS", 126), ("TAIL", 2), ("SAFE_BLOCK", 128)))))
        assert plan(8, 50257, 512, 2, None)[8] is None  # the caller's block
        assert plan(4, 1000, None, 4, None)[8] is None  # one block
        assert plan(16, 50257, None, 2, None)[8] is None
        for heads in range(1, 9):
            for c in (300, 1000, 4097, 32000, 50257, 128256):
                _, block, blocks, _, _, tail, safe, _, fit = plan(heads, c, None, 2, None)
                if blocks == 1:
                    assert fit is None
                    continue
                for b, nb, t, sb in [(block, blocks, tail, safe)] + [tuple(v for _, v in f) for f in fit[1]]:
                    split = b // sb
                    assert b % sb == 0 and nb == -(-c // b)
                    end = (nb - (t + split - 1) // split) * b + t * sb
                    assert c <= end < c + sb, (heads, c, b, nb, t, sb)
    finally:
        cl.launch.plan.cache_clear()


def _check_long_rows(H, block_c, C, vec, safe, tail, kw):
    kw = dict(kw)
    probs, stats = kw.pop("probs", False), kw.pop("return_stats", False)
    z, y = make(H, 6, C, seed=C + H)
    assert cl.launch.vector_width(z, z) == vec
    assert cl.launch.plan(H, C, block_c, 4, None)[5:7] == (tail, safe)
    masked = [block_c + 3, block_c + 130, block_c + 131]
    z[:, 1, masked] = float("-inf")
    y[1] = 7
    z[:, 2, [block_c + 5, block_c + 133]] = 40.0
    y[2] = block_c + 5
    z[:, 3, block_c + 142] = 40.0  # the maximum in the second column of its group (either grouping)
    y[3] = block_c + 142
    y[4] = -100
    if probs:
        y = make_probs(6, C, seed=C, kind="dense")
        y[1, masked] = 0.0
        y[2:4] = 0.0
        y[2, block_c + 5] = y[3, block_c + 142] = 1.0
        y = y.float()
    ref, ker, gr, gk = run_both(z, y, block_c=block_c, **kw)
    assert torch.isfinite(ker).all() and torch.isfinite(gk).all()
    assert_close(ker, ref, atol=2e-5)
    assert_close(gk, gr, atol=2e-6)
    assert (gk[:, 1, masked] == 0).all()
    params = cl.CollabLossParams(block_c=block_c, **kw)
    rs = cl.launch.row_stats_buffer(z, y, params)
    _, st, _, _ = cl.launch.launch(z, y, params, return_stats=stats, save_row_stats=rs)
    if H > 1 or kw.get("label_smoothing"):
        assert rs[8].tolist() == [[0.0, 1.0, 0.0, 0.0, 0.0, 0.0]] * H  # only row 1 ran SAFE
    if stats:
        _, want = collab_loss_reference(z.double(), y, return_stats=True, **kw)
        assert_close(st[0], want.hard, atol=2e-5)
        assert_close(st[1], want.soft, atol=2e-5)
        assert_close(st[2], want.correct, atol=0)
        assert (want.correct >= 2).all()  # rows 2 and 3 count: their (first) maximum is their label


@pytest.mark.parametrize("H", [2, 3])
def test_long_rows_with_a_class_absent_from_one_head_only(H):
    # Head 0 lacks class 20 of row 1, which the other heads' consensus keeps: head 0's soft loss is
    # infinite there (as in the reference), the rest is exact, and the row was flagged for the SAFE path
    # (with H = 2 the finite path's sums come out -inf, not NaN).
    z, y = make(H, 4, 64, seed=7)
    z[0, 1, 20] = float("-inf")
    ref, ker, gr, gk = run_both(z, y, block_c=16, reduction="none")
    assert ker[0, 1] == ref[0, 1] == float("inf")
    keep = torch.ones_like(ref, dtype=torch.bool)
    keep[0, 1] = False
    assert_close(ker[keep], ref[keep], atol=2e-5)
    assert torch.isfinite(gk).all()
    assert_close(gk, gr, atol=2e-6)
    params = cl.CollabLossParams(block_c=16, reduction="none")
    rs = cl.launch.row_stats_buffer(z, y, params)
    cl.launch.launch(z, y, params, save_row_stats=rs)
    assert rs[8].tolist() == [[0.0, 1.0, 0.0, 0.0]] * H


@pytest.mark.parametrize("bad, match", [
    (lambda z: torch.full((5, 9), 0.1), r"shape \[N, C\] = \[5, 10\]"),
    (lambda z: torch.full((5, 10), 0.1, requires_grad=True), "no gradient to a probability target"),
    (lambda z: torch.full((5, 10), -0.1), r"target\[0, 0\] = -0.1.*finite and >= 0"),
    (lambda z: torch.full((5, 10), float("nan")), "finite and >= 0"),
])
def test_bad_probability_targets(bad, match):
    z = torch.randn(2, 5, 10)
    with pytest.raises(ValueError, match=match):
        fused_collab_loss(z, bad(z))
