"""fused_linear_collab_loss: loss and every gradient (hidden, weight, bias) against the float64 reference with
materialised logits, every setting, chunk sizes 1, odd and larger than N, both implementations."""

import pytest
import torch
from conftest import HAS_CUDA, requires_cuda

from collab_fast.kernels.fused_linear_collab_loss import (
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
    from collab_fast.kernels.fused_linear_collab_loss import _pick_chunk

    assert _pick_chunk(2, 10, 50, 4 * 11, None, m.memory_budget) == 3
    loss = m(x, y)
    want = linear_collab_loss_reference(x.double(), m.weight.double(), y, m.bias.double(), temperature=3.0)
    torch.testing.assert_close(loss.double(), want, atol=1e-5, rtol=1e-5)
    loss.backward()
    assert x.grad is not None and m.weight.grad.shape == (2, 50, 8) and m.bias.grad.shape == (2, 50)
    assert m.logits(x).shape == (2, 10, 50)


def test_default_chunk_follows_the_weight_gradient_traffic():
    from collab_fast.kernels.fused_linear_collab_loss import _pick_chunk

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
    (lambda h, w, y: (h, w[0], y), r"weight must be a tensor \[H, C, D\]"),
    (lambda h, w, y: (h[:, :, :3], w, y), "does not match weight"),
    (lambda h, w, y: (h, w, y.float()), "target must be an integer tensor"),
    (lambda h, w, y: (h, w, y[:3]), "target must be an integer tensor"),
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
