"""Fused linear + collaborative loss: the heads' output layers and the collaborative loss, chunk by chunk over
the rows, so that the [H, N, C] logits never exist (language-model vocabularies).

Math. Head h's logits are z_h = x_h W_h^T + b_h (x_h [N, D] its last hidden states, or one x shared by every
head; W_h [C, D]; b_h [C]); the loss is fused_collab_loss(z, target) with every setting of it. The
consensus of a row needs only that row's logits of every head, so rows split into chunks that each hold
all H heads. With g = dL/dz of a chunk (the fused kernel's gradient pass, weighted by the upstream
weights r):

    dx_h  = g_h W_h          (shared x: summed over h)
    dW_h += g_h^T x_h,   db_h += sum_n g_h

Forward for reductions "mean" and "sum" computes the loss and every gradient in one sweep (the gradient
for grad_output = 1, scaled in backward by grad_output: a scalar), as Liger-Kernel's fused linear
cross-entropy does; "none" needs grad_output [H, N] first, so its backward sweeps the chunks again,
recomputing their logits. Peak extra memory: one chunk's logits (the kernel writes the gradient over them)
plus the weight's gradient, whatever N.

Chunk size: `chunk_size` rows; or the most rows whose working set fits `memory_budget` bytes; or (neither
given) 256 MiB of working set, raised to 2048 rows where the weight needs a gradient: every chunk reads and
writes the whole float32 weight gradient once, in a GEMM whose reduction dimension is the chunk's rows, so
few, long chunks (see _pick_chunk). The result does not depend on it (tested). The matmuls run through torch
(cuBLAS on GPU), under autocast as torch's; the loss and its gradient through the Triton kernel on CUDA (impl
"auto"/"triton") or the plain-PyTorch reference (impl "torch", and "auto" on CPU), which is chunked the same
way.

Layout: reference, chunk step, autograd Function, functional API, Module.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import nn

from collab_fast.kernels.collab_loss import (
    _DEFAULT,
    _KERNEL_DTYPES,
    CollabLossParams,
    _check_triton_usable,
    _labels_checked_on_host,
    _launch,
    _num_valid,
    _reference,
    collab_loss_reference,
)

__all__ = ["FusedLinearCollabLoss", "fused_linear_collab_loss", "linear_collab_loss_reference"]

_DEFAULT_BUDGET = 256 * 2**20  # bytes of one chunk's working set, where nothing else decides
_MIN_GRAD_ROWS = 2048  # rows a chunk takes at least while a weight gradient accumulates (see _pick_chunk)


# ----------------------------------------------------------------------------------------------------
# Reference: the logits materialised, then the collaborative loss (autograd gives every gradient).
# ----------------------------------------------------------------------------------------------------


def linear_collab_loss_reference(hidden, weight, target, bias=None, **loss_kwargs):
    """collab_loss_reference(hidden @ weight^T + bias, target, **loss_kwargs); hidden [H, N, D] or [N, D]."""
    z = _logits(hidden, weight, bias)
    return collab_loss_reference(z, target, **loss_kwargs)


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # [H, n, D] @ [H, D, C] -> [H, n, C], rows contiguous. A shared hidden is expanded (a stride-0 batch, no
    # copy): broadcasting [1, n, D] instead lets matmul return the logits transposed (n innermost), which
    # the loss kernel would read with strided, uncoalesced loads.
    x = hidden if hidden.dim() == 3 else hidden.unsqueeze(0).expand(weight.shape[0], -1, -1)
    z = torch.matmul(x, weight.transpose(1, 2))
    return z if bias is None else z + bias.unsqueeze(1)


def _accumulate_bmm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc [H, P, Q] float32 += a [H, P, K] @ b [H, K, Q], a and b in any float dtype. On CUDA, 16-bit
    operands go through cuBLAS with a float32 output that is acc itself (beta = 1): one pass over acc and no
    rounded [H, P, Q] temporaries. Elsewhere the product is formed and added."""
    if a.dtype == acc.dtype:
        acc.baddbmm_(a, b)
    elif acc.is_cuda and _HAS_OUT_DTYPE:
        torch.baddbmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc += torch.bmm(a, b).to(acc.dtype)


def _scaled(g: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """g * s in dtype, rounded once, with no full-size temporary in g's dtype (the weight's gradient of an LM
    head is gigabytes)."""
    return torch.mul(g, s, out=torch.empty_like(g, dtype=dtype))


def _has_out_dtype() -> bool:
    # baddbmm with out_dtype (recent torch; CUDA kernels only)
    try:
        return "out_dtype" in str(torch.ops.aten.baddbmm.dtype_out._schema)
    except (AttributeError, RuntimeError):
        return False


_HAS_OUT_DTYPE = _has_out_dtype()


# ----------------------------------------------------------------------------------------------------
# One chunk: logits, per-row loss and dL/dz weighted by r, then the three gradients.
# ----------------------------------------------------------------------------------------------------


def _chunk_loss_and_grad(z: torch.Tensor, y: torch.Tensor, params: CollabLossParams, r: torch.Tensor,
                         use_kernel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-row loss [H, n] float32 (0 at ignored rows), r * dL/dz [H, n, C] in z's dtype)."""
    if use_kernel:
        # one launch: loss and gradient, the gradient written over the logits (they are not needed after)
        loss, _, g, _ = _launch(z, y, params, compute_loss=True, compute_grad=True, row_weights=r, grad_out=z)
        return loss, g
    with torch.enable_grad():
        zc = z.detach().requires_grad_()
        per = _reference(zc, y, replace(params, reduction="none"))  # [H, n]
        (g,) = torch.autograd.grad((per * r.to(per.dtype)).sum(), zc)
    return per.detach().float(), g


def _sweep(hidden, weight, bias, target, params, r_of, chunk, use_kernel, want_grads):
    """Runs every chunk. r_of(lo, hi) -> upstream weights [H, hi - lo]. Returns (sum of the per-row losses
    [H, N] or their total, grads (hidden, weight, bias) or None)."""
    n = target.shape[0]
    shared = hidden.dim() == 2
    losses = []
    gx = torch.empty_like(hidden) if want_grads and hidden.requires_grad else None
    gw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_grads and weight.requires_grad \
        else None
    gb = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if want_grads and bias is not None \
        and bias.requires_grad else None
    for lo in range(0, n, chunk):
        hi = min(lo + chunk, n)
        x = hidden[lo:hi] if shared else hidden[:, lo:hi]
        z = _logits(x, weight, bias)
        if use_kernel and z.dtype not in _KERNEL_DTYPES:
            z = z.float()
        loss, g = _chunk_loss_and_grad(z, target[lo:hi], params, r_of(lo, hi), use_kernel)
        losses.append(loss)
        if not want_grads:
            continue
        g = g.to(weight.dtype)
        if gx is not None:
            dx = torch.matmul(g, weight)  # [H, n, D]
            if shared:
                gx[lo:hi] = dx.sum(0)
            else:
                gx[:, lo:hi] = dx
        if gw is not None:
            xs = x.unsqueeze(0).expand(g.shape[0], -1, -1) if shared else x
            _accumulate_bmm(gw, g.transpose(1, 2), xs.to(g.dtype))  # [H, C, D] float32
        if gb is not None:
            gb += g.sum(1).float()
    per_row = torch.cat(losses, dim=1) if losses else hidden.new_zeros((weight.shape[0], 0), dtype=torch.float32)
    return per_row, (gx, gw, gb)


def _pick_chunk(num_heads: int, n: int, c: int, element_size: int, chunk_size: int | None, budget: int | None,
                grad_bytes: int = 0) -> int:
    """Rows per chunk (element_size: bytes of working set per logit). chunk_size wins, then a budget the user
    set. Unset (None): the rows whose working set fits 256 MiB, raised to 2048 when a weight gradient of
    grad_bytes (its float32 accumulator) is kept: each chunk reads and writes all of it in one GEMM whose
    reduction dimension is the chunk's rows, which is bound by that traffic, not by arithmetic, below about
    1,200 rows on an H100 (H2 D2048 C128256: 8 chunks of 523 rows moved 8 x 4.2 GB). The raise stops where a
    chunk's logits would outgrow the accumulator itself: peak memory at most about twice the gradient's."""
    if chunk_size is not None:
        return max(1, min(chunk_size, max(n, 1)))
    per_row = max(num_heads * c * element_size, 1)
    if budget is not None:
        return max(1, min(max(n, 1), budget // per_row))
    rows = _DEFAULT_BUDGET // per_row
    if grad_bytes:
        rows = max(rows, min(_MIN_GRAD_ROWS, grad_bytes // per_row))
    return max(1, min(max(n, 1), rows))


# ----------------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------------


class _FusedLinearCollabLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, target, params: CollabLossParams, chunk: int, use_kernel: bool):
        num_heads, n = weight.shape[0], target.shape[0]
        needs = ctx.needs_input_grad[:3]
        count = _num_valid(target, params)
        ctx.params, ctx.chunk, ctx.use_kernel, ctx.weight_dtype = params, chunk, use_kernel, weight.dtype
        if params.reduction == "none":
            with torch.no_grad():
                ones = torch.ones((), device=hidden.device).expand(num_heads, n)
                per_row, _ = _sweep(hidden, weight, bias, target, params, lambda lo, hi: ones[:, lo:hi], chunk,
                                    use_kernel, want_grads=False)
            ctx.save_for_backward(hidden, weight, bias, target)
            return per_row
        scale = 1.0 / count.clamp(min=1).float() if params.reduction == "mean" else torch.ones((), device=hidden.device)
        r = scale.expand(num_heads, max(n, 1))
        with torch.no_grad():
            per_row, grads = _sweep(hidden, weight, bias, target, params, lambda lo, hi: r[:, : hi - lo], chunk,
                                    use_kernel, want_grads=any(needs))
        ctx.save_for_backward(*[g for g in grads])
        return per_row.sum() * scale

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():  # create_graph=True: the gradients below are computed without a graph
            raise RuntimeError(
                "fused_linear_collab_loss: double backward (create_graph=True, e.g. a gradient penalty) is not "
                "supported: its gradients are computed chunk by chunk, outside autograd; use "
                "linear_collab_loss_reference (the logits materialised) for it")
        if ctx.params.reduction == "none":
            hidden, weight, bias, target = ctx.saved_tensors
            go = grad_out.float()
            with torch.no_grad():
                _, (gx, gw, gb) = _sweep(hidden, weight, bias, target, ctx.params, lambda lo, hi: go[:, lo:hi],
                                         ctx.chunk, ctx.use_kernel, want_grads=True)
        else:
            gx, gw, gb = ctx.saved_tensors
            s = grad_out.float()
            gx = None if gx is None else _scaled(gx, s, gx.dtype)
            gw = None if gw is None else _scaled(gw, s, ctx.weight_dtype)
            gb = None if gb is None else _scaled(gb, s, ctx.weight_dtype)
            return gx, gw, gb, None, None, None, None
        gw = None if gw is None else gw.to(ctx.weight_dtype)
        gb = None if gb is None else gb.to(ctx.weight_dtype)
        return gx, gw, gb, None, None, None, None


# ----------------------------------------------------------------------------------------------------
# Functional API
# ----------------------------------------------------------------------------------------------------


def _check(hidden, weight, bias, target) -> None:
    if not isinstance(hidden, torch.Tensor) or hidden.dim() not in (2, 3) or not hidden.is_floating_point():
        raise ValueError("hidden must be a floating-point tensor [H, N, D] (each head's hidden states) or [N, D] "
                         f"(shared), got {getattr(hidden, 'shape', type(hidden).__name__)}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 3:
        raise ValueError(f"weight must be a tensor [H, C, D] (each head's output layer), got "
                         f"{getattr(weight, 'shape', type(weight).__name__)}")
    h, c, d = weight.shape
    if hidden.shape[-1] != d or (hidden.dim() == 3 and hidden.shape[0] != h):
        raise ValueError(f"hidden {tuple(hidden.shape)} does not match weight {tuple(weight.shape)}: expected "
                         f"[{h}, N, {d}] or [N, {d}]")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (h, c)):
        raise ValueError(f"bias must be a tensor [H, C] = [{h}, {c}], got {getattr(bias, 'shape', bias)}")
    n = hidden.shape[-2]
    if not isinstance(target, torch.Tensor) or target.is_floating_point() or target.dim() != 1 or target.shape[0] != n:
        raise ValueError(f"target must be an integer tensor [N] = [{n}] of class indices, got "
                         f"{getattr(target, 'shape', type(target).__name__)}")
    for name, t in (("weight", weight), ("bias", bias), ("target", target)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")
    if c == 0:
        raise ValueError(f"weight {tuple(weight.shape)}: no classes (C == 0); expected [H, C, D] with C >= 1")
    if h == 0:
        raise ValueError(f"weight {tuple(weight.shape)}: no heads (H == 0); expected [H, C, D] with H >= 1")
    if not weight.is_floating_point():
        raise ValueError(f"weight must be a floating-point tensor, got {weight.dtype}")
    if hidden.dtype != weight.dtype and not torch.is_autocast_enabled(hidden.device.type):
        raise ValueError(f"hidden is {hidden.dtype} but weight is {weight.dtype}: give both one dtype (hidden.to("
                         "weight.dtype)), or run under torch.autocast")


def _check_labels(target: torch.Tensor, num_classes: int, params: CollabLossParams) -> None:
    """Out-of-range labels: one line where the labels can be read without a device sync (CPU, or
    COLLAB_FAST_CHECK_LABELS=1), as fused_collab_loss checks them; elsewhere the kernel makes the loss NaN."""
    if not _labels_checked_on_host(target) or target.numel() == 0:
        return
    bad = (target != params.ignore_index) & ((target < 0) | (target >= num_classes))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"target[{i}] = {int(target[i])} is outside [0, {num_classes}) and is not ignore_index "
                         f"({params.ignore_index})")


def fused_linear_collab_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    temperature: float = _DEFAULT.temperature,
    beta: float | None = None,
    soft_weight: float | None = None,
    soft_loss: str = _DEFAULT.soft_loss,
    weights: tuple[float, float] | None = None,
    detach_consensus: bool = _DEFAULT.detach_consensus,
    ignore_index: int = _DEFAULT.ignore_index,
    label_smoothing: float = _DEFAULT.label_smoothing,
    reduction: str = _DEFAULT.reduction,
    impl: str = _DEFAULT.impl,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
):
    """fused_collab_loss(hidden @ weight^T + bias, target, ...) without the [H, N, C] logits.

    Args:
        hidden: [H, N, D] each head's last hidden states, or [N, D] shared by every head.
        weight: [H, C, D] each head's output layer (an lm-head per head); bias: [H, C] or None.
        target: [N] class indices (ignore_index marks rows that count for nothing).
        temperature ... reduction: as fused_collab_loss.
        impl: "auto" (the Triton kernel for CUDA tensors, the reference on CPU), "triton" or "torch".
        chunk_size: rows per chunk; None: the most rows whose working set (the kernel: the chunk's logits; the
            reference: about 11x them) fits memory_budget bytes.
        memory_budget: bytes of a chunk's working set, kept to when given. None: 256 MiB, raised to chunks of
            2048 rows (N if fewer) when the weight needs a gradient, so that the float32 weight gradient, which
            every chunk reads and writes once, is swept a few times, not dozens; capped where a chunk's logits
            would outgrow that gradient (H2 D2048 C128256 bf16: 2048 rows, 1 GiB of logits beside the 2 GiB
            gradient, instead of 523 rows).
    Returns the loss (float32): a scalar, or [H, N] for reduction="none".
    """
    params = CollabLossParams(temperature, beta, soft_weight, detach_consensus, ignore_index, label_smoothing,
                              reduction, impl, None, soft_loss, weights)
    _check(hidden, weight, bias, target)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if memory_budget is not None and (isinstance(memory_budget, bool) or not isinstance(memory_budget, int)
                                      or memory_budget < 1):
        raise ValueError(f"memory_budget must be a positive number of bytes or None, got {memory_budget!r}")
    use_kernel = impl == "triton" or (impl == "auto" and hidden.device.type == "cuda")
    if use_kernel:
        _check_triton_usable(hidden.device)
    if target.dtype in (torch.uint8, torch.int8, torch.int16):
        target = target.long()
    h, c, _ = weight.shape
    _check_labels(target, c, params)
    dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) \
        else torch.promote_types(hidden.dtype, weight.dtype)
    # bytes per logit of a chunk's working set: the kernel's gradient overwrites the logits; the reference's
    # autograd graph holds about 11 logit-sized tensors (measured: 10.75x in fp32)
    esize = torch.finfo(dtype).bits // 8 * (1 if use_kernel else 11)
    wants_grad = torch.is_grad_enabled() and weight.requires_grad
    chunk = _pick_chunk(h, target.shape[0], c, esize, chunk_size, memory_budget,
                        grad_bytes=weight.numel() * 4 if wants_grad else 0)
    return _FusedLinearCollabLoss.apply(hidden, weight, bias, target, params, chunk, use_kernel)


# ----------------------------------------------------------------------------------------------------
# Module
# ----------------------------------------------------------------------------------------------------


class FusedLinearCollabLoss(nn.Module):
    """H output layers (weight [H, C, D], optional bias [H, C]) and the collaborative loss on their logits,
    fused: forward(hidden [H, N, D] or [N, D], target [N]) -> loss. `loss_kwargs`: fused_collab_loss's."""

    def __init__(self, num_heads: int, in_features: int, num_classes: int, bias: bool = False,
                 chunk_size: int | None = None, memory_budget: int | None = None, **loss_kwargs):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_heads, num_classes, in_features))
        self.bias = nn.Parameter(torch.zeros(num_heads, num_classes)) if bias else None
        bound = 1.0 / math.sqrt(in_features)
        nn.init.uniform_(self.weight, -bound, bound)  # nn.Linear's default, per head
        self.chunk_size, self.memory_budget, self.loss_kwargs = chunk_size, memory_budget, loss_kwargs
        CollabLossParams(**loss_kwargs)  # the settings are checked now, not at the first forward

    def forward(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return fused_linear_collab_loss(hidden, self.weight, target, self.bias, chunk_size=self.chunk_size,
                                        memory_budget=self.memory_budget, **self.loss_kwargs)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The [H, N, C] logits (inference, small N)."""
        return _logits(hidden, self.weight, self.bias)
