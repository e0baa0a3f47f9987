"""fused_linear_collab_loss: loss and every gradient (hidden, weight, bias) against the float64 reference with
materialised logits, every setting, chunk sizes 1, odd and larger than N, both implementations."""

import pytest
import torch
from conftest import HAS_CUDA, requires_cuda

from collab_fast.kernels.collab_loss import CollabLossParams
from collab_fast.kernels.fused_linear import (
    FusedLinearCollabLoss,
    fused_linear_collab_loss,
    linear_collab_loss_reference,
)

# On a GPU host the implementations run on CUDA tensors (the kernel needs them there; the interpreter is off).
DEV = torch.device("cuda" if HAS_CUDA else "cpu")


def _inputs(H=3, N=7, D=5, C=11, shared=False, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g, dtype=torch.float64) if shared else \
        torch.randn(H, N, D, generator=g, dtype=torch.float64)
    weight = torch.randn(H, C, D, generator=g, dtype=torch.float64)
    b = torch.randn(H, C, generator=g, dtype=torch.float64) if bias else None
    y = torch.randint(0, C, (N,), generator=g)
    y[2] = -100
    return hidden, weight, b, y


def _both(hidden, weight, bias, y, impl, chunk, dtype=torch.float32, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight) + ((bias,) if bias is not None else ())]
    ref = linear_collab_loss_reference(leaves[0], leaves[1], y, leaves[2] if bias is not None else None, **kw)
    mine = [t.detach().to(DEV, dtype).requires_grad_() for t in leaves]
    got = fused_linear_collab_loss(mine[0], mine[1], y.to(DEV), mine[2] if bias is not None else None, impl=impl,
                                   chunk_size=chunk, **kw)
    up = torch.rand(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) + 0.5
    ref.backward(up)
    got.backward(up.to(DEV, torch.float32))
    return ref, got.cpu(), [t.grad for t in leaves], [t.grad.cpu() for t in mine]


SETTINGS = [dict(), dict(temperature=3.0, beta=0.3), dict(soft_loss="kl", weights=(1.0, 2.0)),
            dict(detach_consensus=False), dict(label_smoothing=0.1, reduction="sum"), dict(reduction="none"),
            dict(reduction="none", detach_consensus=False, soft_loss="kl")]


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("chunk", [1, 3, 100])
@pytest.mark.parametrize("kw", SETTINGS)
def test_matches_the_materialised_reference(impl, chunk, kw):
    hidden, weight, bias, y = _inputs()
    ref, got, gr, gg = _both(hidden, weight, bias, y, impl, chunk, **kw)
    assert got.shape == ref.shape and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, atol=2e-5, rtol=1e-5)
    for a, b in zip(gg, gr):
        torch.testing.assert_close(a.double(), b, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("H", [1, 2, 4])
def test_shared_hidden_no_bias_and_one_head(impl, H):
    hidden, weight, _, y = _inputs(H=H, shared=True, bias=False, C=40)
    ref, got, gr, gg = _both(hidden, weight, None, y, impl, 2, label_smoothing=0.05)
    torch.testing.assert_close(got.double(), ref, atol=2e-5, rtol=1e-5)
    for a, b in zip(gg, gr):
        torch.testing.assert_close(a.double(), b, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_result_independent_of_the_chunk_size(impl):
    hidden, weight, bias, y = _inputs(N=13, C=70, seed=3)
    outs = []
    for chunk in (1, 4, 13, None):
        ref, got, _, gg = _both(hidden, weight, bias, y, impl, chunk)
        outs.append((got, gg))
    for got, gg in outs[1:]:
        torch.testing.assert_close(got, outs[0][0], atol=1e-6, rtol=1e-6)
        for a, b in zip(gg, outs[0][1]):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_module_and_memory_budget_chunking():
    torch.manual_seed(0)
    m = FusedLinearCollabLoss(2, 8, 50, bias=True, memory_budget=2 * 50 * 4 * 11 * 3, temperature=3.0)  # 3 rows
    x = torch.randn(2, 10, 8, requires_grad=True)
    y = torch.randint(0, 50, (10,))
    from collab_fast.kernels.fused_linear import _pick_chunk

    assert _pick_chunk(2, 10, 50, 4 * 11, None, m.memory_budget) == 3
    loss = m(x, y)
    want = linear_collab_loss_reference(x.double(), m.weight.double(), y, m.bias.double(), temperature=3.0)
    torch.testing.assert_close(loss.double(), want, atol=1e-5, rtol=1e-5)
    loss.backward()
    assert x.grad is not None and m.weight.grad.shape == (2, 50, 8) and m.bias.grad.shape == (2, 50)
    assert m.logits(x).shape == (2, 10, 50)


def test_default_chunk_follows_the_weight_gradient_traffic():
    from collab_fast.kernels.fused_linear import _pick_chunk

    gw = lambda h, c, d: h * c * d * 4  # the float32 weight-gradient accumulator
    # LM heads (bf16 logits): 256 MiB alone would give 523-row chunks, each sweeping the 2 GiB gradient
    assert _pick_chunk(2, 4096, 128256, 2, None, 256 * 2**20) == 523  # a budget the user sets is kept
    assert _pick_chunk(2, 4096, 128256, 2, None, None, grad_bytes=gw(2, 128256, 2048)) == 2048
    assert _pick_chunk(4, 2048, 32000, 2, None, None, grad_bytes=gw(4, 32000, 1024)) == 2048  # one chunk
    assert _pick_chunk(2, 4096, 128256, 2, None, None) == 523  # frozen weight: no gradient traffic
    # the raise stops where a chunk's logits would outgrow the gradient (small D): 256 rows of 1 MiB
    assert _pick_chunk(2, 4096, 128256, 4, None, None, grad_bytes=gw(2, 128256, 256)) == 261
    assert _pick_chunk(2, 4096, 128256, 4, None, None, grad_bytes=gw(2, 128256, 600)) == 600
    assert _pick_chunk(2, 100, 128256, 2, None, None, grad_bytes=gw(2, 128256, 2048)) == 100  # N rows at most
    assert _pick_chunk(2, 4096, 128256, 2, 7, None, grad_bytes=gw(2, 128256, 2048)) == 7  # chunk_size wins
    with pytest.raises(ValueError, match="memory_budget must be a positive number of bytes or None"):
        fused_linear_collab_loss(torch.randn(3, 4), torch.randn(2, 5, 4), torch.tensor([0, 1, 2]), memory_budget=0)


@pytest.mark.parametrize("args, match", [
    (lambda h, w, y: (h[0, 0], w, y), "hidden must be a floating-point tensor"),
    (lambda h, w, y: (h, w[0, 0], y), r"weight must be a tensor \[H, C, D\] .* or \[C, D\]"),
    (lambda h, w, y: (h[:, :, :3], w, y), "does not match weight"),
    (lambda h, w, y: (h, w, y.float()), r"target: probabilities must be \[N, 11\] or \[B, T, 11\]"),
    (lambda h, w, y: (h, w, y[:3]), r"hidden \(3, 7, 5\) does not match .* expected \[3, 3, 5\] or \[3, 5\]"),
    (lambda h, w, y: (h, w, y.view(1, 7)), r"hidden \(3, 7, 5\) does not match .* target \(1, 7\): expected "
                                           r"\[3, 1, 7, 5\] or \[1, 7, 5\]"),
    (lambda h, w, y: (h[0, 0], w, y.view(1, 7)), r"hidden must be a floating-point tensor \[B, T, D\] \(shared\) or "
                                                 r"\[H, B, T, D\] for target \(1, 7\)"),
    (lambda h, w, y: (h, w, y.bool()), "target must be class indices"),
    (lambda h, w, y: (h, w[0], y, torch.zeros(3, 11)), r"bias must be a tensor \[11\] for weight \(11, 5\)"),
    (lambda h, w, y: (h, w, torch.where(torch.arange(7) == 4, 11, y)), r"target\[4\] = 11 is outside \[0, 11\)"),
    (lambda h, w, y: (h, w, torch.where(torch.arange(7) == 0, -5, y)), r"target\[0\] = -5 is outside"),
    (lambda h, w, y: (h, w[:, :0], y), r"no classes \(C == 0\)"),
    (lambda h, w, y: (h[:0], w[:0], y), r"no heads \(H == 0\)"),
    (lambda h, w, y: (h, w.bfloat16(), y), "hidden is torch.float32 but weight is torch.bfloat16: give both one dtype"),
])
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_bad_input_is_one_line(args, match, impl):
    h, w, _, y = _inputs(bias=False)
    with pytest.raises(ValueError, match=match) as info:
        fused_linear_collab_loss(*args(h.float(), w.float(), y), impl=impl)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_collab_loss(h.float(), w.float(), y, chunk_size=0)


@pytest.mark.parametrize("kw, error, match", [
    (dict(softcap=0.0), ValueError, r"softcap must be a finite number in \(0.0, inf\)"),
    (dict(softcap=float("inf")), ValueError, "softcap must be a finite number"),
    (dict(lse_square_scale=-1e-4), ValueError, r"lse_square_scale must be a finite number in \[0.0, inf\)"),
    (dict(lse_square_scale="1e-4"), TypeError, "lse_square_scale must be a real number"),
    (dict(return_stats=1), ValueError, "return_stats must be True or False"),
    (dict(shift_labels="yes"), ValueError, "shift_labels must be True or False"),
])
def test_bad_options_are_one_line(kw, error, match):
    h, w, _, y = _inputs(bias=False)
    with pytest.raises(error, match=match):
        fused_linear_collab_loss(h.float(), w.float(), y, **kw)
    with pytest.raises(error, match=match):
        FusedLinearCollabLoss(3, 5, 11, **kw)


def test_probability_targets_cannot_shift_and_the_kernel_takes_no_float64():
    h, w, _, y = _inputs(bias=False)
    probs = torch.softmax(torch.randn(7, 11, dtype=torch.float64), -1)
    with pytest.raises(ValueError, match="shift_labels=True takes class indices"):
        fused_linear_collab_loss(h, w, probs, shift_labels=True)
    with pytest.raises(TypeError, match="impl='triton' takes float32, bfloat16 or float16 inputs, got torch.float64"):
        fused_linear_collab_loss(h, w, y, impl="triton")


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_double_backward_is_refused_not_silently_wrong(impl, reduction):
    # A gradient penalty differentiates the gradients; these are computed chunk by chunk outside autograd, so
    # create_graph=True is refused (it used to return a penalty gradient of the wrong value).
    h, w, b, y = (t if t is None or not t.is_floating_point() else t.float().to(DEV).requires_grad_()
                  for t in _inputs())
    loss = fused_linear_collab_loss(h, w, y.to(DEV), b, impl=impl, reduction=reduction).sum()
    with pytest.raises(RuntimeError, match="double backward .* use linear_collab_loss_reference"):
        torch.autograd.grad(loss, [h, w], create_graph=True)
    # the reference computes it
    ref = linear_collab_loss_reference(h, w, y.to(DEV), b, reduction=reduction).sum()
    gh, _ = torch.autograd.grad(ref, [h, w], create_graph=True)
    assert gh.square().sum().requires_grad


def test_under_autocast_bf16_matches_fp32_within_bf16_precision():
    hidden, weight, bias, y = _inputs(N=16, C=64, D=32)
    x, w = hidden.float().requires_grad_(), weight.float().requires_grad_()
    want = fused_linear_collab_loss(x, w, y, chunk_size=5)
    want.backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused_linear_collab_loss(x, w, y, chunk_size=5)
    got.backward()
    assert got.dtype == torch.float32 and w.grad.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(x.grad, gx, rtol=0.1, atol=3e-2)
    torch.testing.assert_close(w.grad, gw, rtol=0.1, atol=3e-2)


@requires_cuda
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gpu_vocabulary_size_bf16_against_float64(reduction):
    # An LM-like shape on the GPU (bf16 operands, several chunks, a vocabulary that is no power of two) against
    # the float64 reference on the same bf16-rounded values: relative norm errors at bf16's scale.
    H, N, D, C = 2, 384, 128, 32003
    g = torch.Generator().manual_seed(11)
    x = (torch.randn(H, N, D, generator=g) / D**0.5).bfloat16()
    w = (torch.randn(H, C, D, generator=g) / D**0.5).bfloat16()
    y = torch.randint(0, C, (N,), generator=g)
    y[::7] = -100
    xr, wr = x.double().requires_grad_(), w.double().requires_grad_()
    ref = linear_collab_loss_reference(xr, wr, y, reduction=reduction)
    xg, wg = x.cuda().requires_grad_(), w.cuda().requires_grad_()
    got = fused_linear_collab_loss(xg, wg, y.cuda(), reduction=reduction, chunk_size=100)
    up = torch.rand(ref.shape, dtype=torch.float64, generator=g) + 0.5
    ref.backward(up)
    got.backward(up.cuda().float())

    def rel(a, b):
        return ((a.double().cpu() - b).norm() / b.norm()).item()

    assert torch.isfinite(got).all()
    assert rel(got, ref.detach()) < 1e-2
    assert rel(xg.grad, xr.grad) < 2e-2 and rel(wg.grad, wr.grad) < 2e-2


# ---------------------------------------------------------------------------------------- the LM-facing API


def _compare(make_args, impl, chunk, dtype=torch.float32, ref_fn=None, tol=(2e-5, 1e-4), **kw):
    """The fused loss (impl, chunk, dtype) and ref_fn (default: the materialised reference, float64) on the same
    leaves: loss and every leaf's gradient under an upstream gradient other than 1."""
    leaves64 = [t.detach().clone().requires_grad_() if t.is_floating_point() and t.dim() > 0 and t.dtype ==
                torch.float64 and i != 2 else t for i, t in enumerate(make_args())]
    ref_fn = ref_fn or (lambda *a, **k: linear_collab_loss_reference(*a, **k))
    ref = ref_fn(*leaves64, **kw)
    mine = [t.detach().to(DEV, dtype).requires_grad_() if t.requires_grad else
            (t.to(DEV) if t is not None else None) for t in leaves64]
    got = fused_linear_collab_loss(*mine, impl=impl, chunk_size=chunk, **kw)
    up = torch.rand(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) + 0.5
    ref.backward(up)
    got.backward(up.to(DEV, got.dtype))
    assert got.shape == ref.shape
    torch.testing.assert_close(got.double().cpu(), ref.detach(), atol=tol[0], rtol=tol[1])
    for a, b in zip(mine, leaves64):
        if b is not None and b.requires_grad:
            torch.testing.assert_close(a.grad.double().cpu(), b.grad, atol=tol[0], rtol=tol[1])
    return got


def _lm(B=2, T=5, D=6, C=13, H=3, shared_hidden=False, shared_weight=False, bias=True, probs=False, seed=3):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*(() if shared_hidden else (H,)), B, T, D, generator=g, dtype=torch.float64)
    weight = torch.randn(*(() if shared_weight else (H,)), C, D, generator=g, dtype=torch.float64) / 2
    b = torch.randn(*(() if shared_weight else (H,)), C, generator=g, dtype=torch.float64) if bias else None
    if probs:
        y = torch.softmax(torch.randn(B, T, C, generator=g, dtype=torch.float64), -1)
    else:
        y = torch.randint(0, C, (B, T), generator=g)
        y[0, 1] = -100
    return hidden, weight, y, b


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("chunk", [1, 4, 100])
@pytest.mark.parametrize("layout", ["per-head", "shared-hidden", "shared-weight", "probs"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_batched_sequences_and_a_shared_weight_match_the_flat_per_head_call(impl, chunk, layout, reduction):
    # [B, T, D] / [H, B, T, D] hidden, [B, T] targets, a [C, D] weight shared by the heads: the same loss and
    # gradients as the flat per-head call on [H, N, D], [N] and the weight repeated per head ([H, C, D]).
    H, B, T, D, C = 3, 2, 5, 6, 13
    hidden, weight, y, b = _lm(shared_hidden=layout == "shared-hidden", shared_weight=layout == "shared-weight",
                               probs=layout == "probs")

    def flat(x, w, t, bias, **kw):
        x = x.reshape(H, B * T, D) if x.dim() == 4 else x.reshape(B * T, D)
        w3 = w.expand(H, C, D) if w.dim() == 2 else w
        b3 = None if bias is None else bias.expand(H, C) if bias.dim() == 1 else bias
        t = t.reshape(B * T, C) if t.is_floating_point() else t.reshape(B * T)
        out = linear_collab_loss_reference(x, w3, t, b3, **kw)
        return out.reshape(H, B, T) if out.dim() == 2 else out

    got = _compare(lambda: (hidden, weight, y, b), impl, chunk, ref_fn=flat, reduction=reduction, temperature=3.0)
    assert got.shape == ((H, B, T) if reduction == "none" else ())


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("kw", [dict(softcap=2.5), dict(lse_square_scale=0.01), dict(softcap=3.0, lse_square_scale=0.1),
                                dict(softcap=2.0, lse_square_scale=0.05, reduction="none", label_smoothing=0.1),
                                dict(lse_square_scale=0.02, reduction="sum", soft_loss="kl")])
@pytest.mark.parametrize("chunk", [3, 100])
def test_softcap_and_z_loss_match_the_reference(impl, kw, chunk):
    _compare(lambda: _lm(), impl, chunk, **kw)
    _compare(lambda: _lm(probs=True), impl, chunk, **kw)  # probability targets too


def test_softcap_and_z_loss_reference_is_the_published_formula():
    # One head, no soft term: cross-entropy of cap tanh(z / cap) plus s * lse^2 over the counted rows, by hand.
    hidden, weight, y, b = _lm(H=1, bias=True)
    z = hidden[0] @ weight[0].T + b[0]  # [B, T, C]
    zc = 4.0 * torch.tanh(z / 4.0)
    valid = y != -100
    lse = torch.logsumexp(zc, -1)
    want = (torch.nn.functional.cross_entropy(zc.reshape(-1, 13), y.reshape(-1), reduction="sum")
            + 1e-2 * lse[valid].square().sum()) / valid.sum()
    got = linear_collab_loss_reference(hidden, weight, y, b, softcap=4.0, lse_square_scale=1e-2)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_shift_labels_is_hugging_faces_causal_shift(impl):
    # position t predicts label t + 1; the last position of each sequence counts for nothing
    hidden, weight, y, b = _lm()
    shifted = torch.cat([y[:, 1:], torch.full((2, 1), -100)], 1)
    got = fused_linear_collab_loss(hidden.float(), weight.float(), y, b.float(), shift_labels=True, impl=impl)
    want = fused_linear_collab_loss(hidden.float(), weight.float(), shifted, b.float(), impl=impl)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    _compare(lambda: (hidden, weight, y, b), impl, 3, shift_labels=True)
    # one head against transformers' own ForCausalLMLoss formula: logits[..., :-1, :] against labels[..., 1:]
    z = hidden[0] @ weight[0].T + b[0]
    want = torch.nn.functional.cross_entropy(z[:, :-1].reshape(-1, 13), y[:, 1:].reshape(-1), ignore_index=-100)
    got = fused_linear_collab_loss(hidden[:1], weight[:1], y, b[:1], shift_labels=True, impl="torch")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("probs", [False, True])
def test_return_stats_equal_fused_collab_loss_on_the_materialised_logits(impl, probs):
    from collab_fast import fused_collab_loss
    from collab_fast.kernels.fused_linear import _logits

    hidden, weight, y, b = (t.float() if t.is_floating_point() else t for t in _lm(probs=probs, B=3, T=7))
    loss, stats = fused_linear_collab_loss(hidden, weight, y, b, impl=impl, chunk_size=4, return_stats=True)
    z = _logits(hidden.reshape(3, 21, 6), weight, b)
    want_loss, want = fused_collab_loss(z, y.reshape(21, 13) if probs else y.reshape(21), impl="torch",
                                        return_stats=True)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    for name in ("hard", "soft", "correct", "num_valid"):
        torch.testing.assert_close(getattr(stats, name), getattr(want, name), rtol=1e-5, atol=1e-5, msg=name)
    assert stats.num_valid.item() == (21 if probs else 20)


def test_float64_stays_float64_end_to_end():
    hidden, weight, y, b = _lm()
    got = _compare(lambda: (hidden, weight, y, b), "auto", 4, dtype=torch.float64, tol=(1e-12, 1e-12),
                   lse_square_scale=0.01, softcap=5.0)
    assert got.dtype == torch.float64 or DEV.type == "cuda"


def test_non_contiguous_inputs():
    hidden, weight, y, b = _lm()
    _compare(lambda: (hidden.transpose(1, 2).contiguous().transpose(1, 2), weight.transpose(1, 2).contiguous()
                      .transpose(1, 2), y.t().contiguous().t(), b), "torch", 3, softcap=2.0)


_DTENSOR = """
import os, sys, torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
from collab_fast import fused_linear_collab_loss
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
mesh = init_device_mesh("cpu", (1,))
w = distribute_tensor(torch.randn(2, 11, 5), mesh, [Shard(1)])
try:
    fused_linear_collab_loss(torch.randn(2, 7, 5), w, torch.randint(0, 11, (7,)))
except ValueError as exc:
    print("REFUSED", exc)
dist.destroy_process_group()
"""


def test_a_dtensor_is_refused_in_one_line(tmp_path):
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", _DTENSOR, str(tmp_path / "store")], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("REFUSED"))
    assert "weight is a DTensor (S(1)): fused_linear_collab_loss takes local tensors; pass " \
           "weight.full_tensor()" in line


@pytest.mark.parametrize("kw", [dict(), dict(reduction="none", softcap=3.0), dict(reduction="sum", lse_square_scale=0.01),
                                dict(return_stats=True, temperature=3.0)])
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiles_fullgraph_and_equals_eager(kw, backend):
    # the whole loss is one opaque op in the graph (no break: fullgraph=True compiles), forward and backward
    hidden, weight, y, b = (t.float() if t.is_floating_point() else t for t in _lm())
    w2 = weight[0].clone()  # a shared [C, D] weight too

    def step(x, w, w_shared, bias):
        out = fused_linear_collab_loss(x, w, y, bias, chunk_size=4, **kw)
        out2 = fused_linear_collab_loss(x, w_shared, y, chunk_size=3, **kw)
        loss, loss2 = (out[0], out2[0]) if kw.get("return_stats") else (out, out2)
        total = (loss * torch.linspace(0.5, 1.5, loss.numel()).view(loss.shape)).sum() + loss2.sum()
        return (total, out[1]) if kw.get("return_stats") else (total, None)

    leaves = [t.clone().requires_grad_() for t in (hidden, weight, w2, b)]
    want, want_stats = step(*leaves)
    want.backward()
    grads = [t.grad for t in leaves]
    torch._dynamo.reset()
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, w2, b)]
    got, got_stats = torch.compile(step, fullgraph=True, backend=backend)(*leaves)
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for a, g in zip(leaves, grads):
        torch.testing.assert_close(a.grad, g, rtol=1e-5, atol=1e-6)
    if want_stats is not None:
        for a, g in zip(got_stats, want_stats):
            torch.testing.assert_close(a, g)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_the_custom_ops_pass_opcheck(reduction):
    from collab_fast.kernels.fused_linear import _LinearExtras, _op_params

    hidden, weight, y, b = (t.float() if t.is_floating_point() else t for t in _lm())
    x, w, bias = hidden.reshape(3, 10, 6).requires_grad_(), weight.requires_grad_(), b.requires_grad_()
    params = CollabLossParams(reduction=reduction)
    args = (x, w, bias, y.reshape(10), *_op_params(params, _LinearExtras(softcap=2.0, z_loss=0.01)), 4, False, True,
            True, True, torch.float32, True)
    torch.library.opcheck(torch.ops.collab_fast.fused_linear_collab_loss_forward, args)


def test_compiled_under_autocast_runs_the_matmuls_in_the_autocast_dtype():
    # autocast does not reach into a custom op: the op casts float32 operands to autocast's dtype itself, so a
    # compiled bf16 step computes what the eager one does (not a float32 matmul, 1e-2 away)
    hidden, weight, y, b = (t.float() if t.is_floating_point() else t for t in _lm(D=64, C=50))

    def step(x, w):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fused_linear_collab_loss(x, w, y, chunk_size=4)

    leaves = [t.clone().requires_grad_() for t in (hidden, weight)]
    want = step(*leaves)
    want.backward()
    grads = [t.grad for t in leaves]
    fp32 = fused_linear_collab_loss(hidden, weight, y, chunk_size=4)
    torch._dynamo.reset()
    leaves = [t.clone().requires_grad_() for t in (hidden, weight)]
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(*leaves)
    got.backward()
    assert (want - fp32).abs() > 1e-4  # bf16 matmuls differ from float32's here ...
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)  # ... and the compiled loss has them
    for a, g in zip(leaves, grads):
        assert a.grad.dtype == torch.float32
        # bf16-level: eager accumulates the weight's gradient from float32 operands, the op from bf16 ones
        torch.testing.assert_close(a.grad, g, rtol=2e-2, atol=3e-3)


# -------------------------------------------------------------------------- soft_factor


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("kw", [dict(), dict(reduction="none", detach_consensus=False, soft_loss="kl"),
                                dict(reduction="sum", softcap=2.5, lse_square_scale=0.01, chunk_size=3)])
def test_soft_factor_scales_the_soft_coefficient(impl, kw):
    # soft_factor f is weights=(k_hard, f * k_soft): loss and every gradient against the float64 reference,
    # with an upstream gradient other than 1
    hidden, weight, bias, y = _inputs()
    k = CollabLossParams()
    ref_kw = {a: v for a, v in kw.items() if a != "chunk_size"}
    for f in (0.0, 0.37, 1.5):
        leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
        ref = linear_collab_loss_reference(*leaves[:2], y, leaves[2], weights=(k.hard_coef, k.soft_coef * f),
                                           **ref_kw)
        mine = [t.detach().to(DEV, torch.float32).requires_grad_() for t in leaves]
        got = fused_linear_collab_loss(mine[0], mine[1], y.to(DEV), mine[2], impl=impl,
                                       soft_factor=torch.tensor(f, device=DEV), **kw)
        up = torch.rand(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) + 0.5
        ref.backward(up)
        got.backward(up.to(DEV, torch.float32))
        torch.testing.assert_close(got.cpu().double(), ref, atol=2e-5, rtol=1e-5, msg=f"f={f}")
        for a, b in zip(mine, leaves):
            torch.testing.assert_close(a.grad.cpu().double(), b.grad, atol=2e-5, rtol=1e-4, msg=f"f={f}")


def test_soft_factor_changes_without_recompiling_and_the_ops_pass_opcheck():
    from torch._dynamo.testing import CompileCounterWithBackend

    from collab_fast.kernels.fused_linear import _LinearExtras, _op_params

    hidden, weight, y, b = (t.float() if t.is_floating_point() else t for t in _lm())
    f = torch.tensor(1.0)

    def step(x, w, bias):
        per = fused_linear_collab_loss(x, w, y, bias, chunk_size=4, reduction="none", soft_factor=f)
        return (per * torch.linspace(0.5, 1.5, per.numel()).view(per.shape)).sum()

    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    for value in (1.0, 0.25, 0.0):
        f.fill_(value)
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, b)]
        compiled(*leaves).backward()
        eager = [t.clone().requires_grad_() for t in (hidden, weight, b)]
        step(*eager).backward()
        for a, e in zip(leaves, eager):
            torch.testing.assert_close(a.grad, e.grad, rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 1
    x, w, bias = hidden.reshape(3, 10, 6).requires_grad_(), weight.requires_grad_(), b.requires_grad_()
    for reduction in ("mean", "none"):
        args = (x, w, bias, y.reshape(10), *_op_params(CollabLossParams(reduction=reduction), _LinearExtras()), 4,
                False, True, True, True, torch.float32, False, torch.tensor(0.5))
        torch.library.opcheck(torch.ops.collab_fast.fused_linear_collab_loss_forward, args)


@pytest.mark.parametrize("value, error, match", [
    (0.5, TypeError, "soft_factor must be a one-element float tensor on the hidden's device"),
    (torch.tensor([0.5, 1.0]), ValueError, r"soft_factor must be a one-element float tensor, got torch.float32 of "
                                           r"shape \(2,\)"),
    (torch.tensor(0.5, requires_grad=True), ValueError, r"soft_factor: the loss gives it no gradient"),
    (torch.tensor(-1.0), ValueError, "soft_factor must be finite and >= 0, got -1.0"),
])
def test_bad_soft_factor_is_one_line(value, error, match):
    h, w, _, y = _inputs(bias=False)
    with pytest.raises(error, match=match) as info:
        fused_linear_collab_loss(h.float(), w.float(), y, soft_factor=value)
    assert "\n" not in str(info.value)
