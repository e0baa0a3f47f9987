"""Fused linear + collaborative loss: the heads' output layers and the collaborative loss, chunk by chunk over
the rows, so that the [H, N, C] logits never exist (language-model vocabularies).

Math. Head h's logits are z_h = x_h W_h^T + b_h (x_h [N, D] its last hidden states, or one x shared by every
head; W_h [C, D] its own output layer, or one W [C, D] shared by every head; b_h [C]), optionally soft-capped,
z <- cap tanh(z / cap) (Gemma 2's final-logit softcapping); the loss is fused_collab_loss(z, target) with
every setting of it, plus the z-loss s * lse_h(z)^2 of each head and counted row (PaLM's auxiliary loss, as
Liger-Kernel's `lse_square_scale`). The consensus of a row needs only that row's logits of every head, so
rows split into chunks that each hold all H heads. With g = dL/dz of a chunk (the fused kernel's gradient
pass, weighted by the upstream weights r; the z-loss adds 2 s lse r softmax(z), the cap multiplies by
1 - tanh^2):

    dx_h  = g_h W_h          (shared x: summed over h)
    dW_h += g_h^T x_h,   db_h += sum_n g_h          (shared W, b: summed over h)

Shapes. target [N] class indices or [N, C] probabilities, or a batch of sequences [B, T] / [B, T, C]; hidden
then [N, D] / [B, T, D] (shared) or [H, N, D] / [H, B, T, D] (per head): the target's shape decides which,
so [H, N, D] and [B, T, D] never mix up. shift_labels: position t predicts label t + 1, as Hugging Face's
causal-LM loss (the labels shift, the last position of each sequence is ignored; no copy of the hidden states).
reduction="none" gives [H, N] or [H, B, T].

Forward for reductions "mean" and "sum" computes the loss and every gradient in one sweep (the gradient
for grad_output = 1, scaled in backward by grad_output: a scalar), as Liger-Kernel's fused linear
cross-entropy does; "none" needs grad_output [H, N] first, so its backward sweeps the chunks again,
recomputing their logits. Peak extra memory: one chunk's logits (the kernel writes the gradient over them;
softcap and z-loss keep a float32 copy and one more chunk-sized buffer) plus the weight's gradient, whatever N.

Chunk size: `chunk_size` rows; or the most rows whose working set fits `memory_budget` bytes; or (neither
given) 256 MiB of working set, raised to 2048 rows where the weight needs a gradient: every chunk reads and
writes the whole float32 weight gradient once, in a GEMM whose reduction dimension is the chunk's rows, so
few, long chunks (see _pick_chunk). The result does not depend on it (tested). The matmuls run through torch
(cuBLAS on GPU), under autocast as torch's; the loss and its gradient through the Triton kernel on CUDA (impl
"auto" for float32/bfloat16/float16, or "triton") or the plain-PyTorch reference (impl "torch", "auto" on CPU
and for float64, which then stays float64 end to end), which is chunked the same way.

Layout: shapes, reference, chunk step, autograd Function, functional API, Module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn

from collab_fast.kernels.collab_loss.api import check_soft_factor, labels_checked_on_host
from collab_fast.kernels.collab_loss.autograd import params_args, params_from
from collab_fast.kernels.collab_loss.launch import check_triton_usable, launch, num_valid
from collab_fast.kernels.collab_loss.params import DEFAULT, KERNEL_DTYPES, CollabLossParams, CollabStats, check_number
from collab_fast.kernels.collab_loss.reference import collab_loss_reference, reference

__all__ = ["FusedLinearCollabLoss", "fused_linear_collab_loss", "linear_collab_loss_reference"]

_DEFAULT_BUDGET = 256 * 2**20  # bytes of one chunk's working set, where nothing else decides
_MIN_GRAD_ROWS = 2048  # rows a chunk takes at least while a weight gradient accumulates (see _pick_chunk)


@dataclass(frozen=True)
class _LinearExtras:
    """What the output layer adds around the collaborative loss: softcapping and the z-loss."""

    softcap: float | None = None
    z_loss: float = 0.0


# ----------------------------------------------------------------------------------------------------
# Shapes: one check of every input, then the flat layout the chunks run on.
# ----------------------------------------------------------------------------------------------------


def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def _refuse_dtensors(**tensors) -> None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed
        return
    for name, t in tensors.items():
        if isinstance(t, DTensor):
            raise ValueError(
                f"{name} is a DTensor ({', '.join(map(str, t.placements))}): fused_linear_collab_loss takes local "
                f"tensors; pass {name}.full_tensor() (a weight sharded over the vocabulary would need a softmax "
                "across ranks, which this loss does not compute), or shard the rows (data parallel) instead")


def _layout(hidden, weight, bias, target, shift_labels: bool, ignore_index: int):
    """Checks the inputs and returns (hidden [H, N, D] or [N, D], weight [H, C, D] or [C, D], bias [H, C] / [C]
    or None, target [N] or [N, C], lead: the target's row shape (N,) or (B, T))."""
    _refuse_dtensors(hidden=hidden, weight=weight, bias=bias, target=target)
    if not isinstance(weight, torch.Tensor) or weight.dim() not in (2, 3):
        raise ValueError(f"weight must be a tensor [H, C, D] (each head's output layer) or [C, D] (one shared by "
                         f"every head), got {_shape(weight)}")
    c, d = weight.shape[-2:]
    if not isinstance(target, torch.Tensor) or target.dim() == 0 or target.dtype == torch.bool:
        raise ValueError(f"target must be class indices [N] or [B, T] (an integer tensor) or probabilities [N, C] "
                         f"or [B, T, C], got {_shape(target)}")
    probs = target.is_floating_point()
    lead = tuple(target.shape[:-1]) if probs else tuple(target.shape)
    if probs and (target.shape[-1] != c or not lead or len(lead) > 2):
        raise ValueError(f"target: probabilities must be [N, {c}] or [B, T, {c}] (C from weight "
                         f"{tuple(weight.shape)}); class indices an integer tensor [N] or [B, T], got "
                         f"{target.dtype} {tuple(target.shape)}")
    if not probs and len(lead) > 2:
        raise ValueError(f"target must be class indices [N] or [B, T] (an integer tensor), got {tuple(target.shape)}")
    if not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point() \
            or hidden.dim() not in (len(lead) + 1, len(lead) + 2):
        want = "[N, D] (shared) or [H, N, D]" if len(lead) == 1 else "[B, T, D] (shared) or [H, B, T, D]"
        got = f"{hidden.dtype} {tuple(hidden.shape)}" if isinstance(hidden, torch.Tensor) else _shape(hidden)
        raise ValueError(f"hidden must be a floating-point tensor {want} for target {tuple(target.shape)}, got {got}")
    per_head = hidden.dim() == len(lead) + 2
    h = hidden.shape[0] if per_head else weight.shape[0] if weight.dim() == 3 else 1
    if hidden.shape[-1] != d or tuple(hidden.shape[int(per_head):-1]) != lead \
            or (per_head and weight.dim() == 3 and weight.shape[0] != h):
        want = (f"[{h}, " if weight.dim() == 3 else "[H, ") + ", ".join(map(str, lead)) + f", {d}]"
        raise ValueError(f"hidden {tuple(hidden.shape)} does not match weight {tuple(weight.shape)} and target "
                         f"{tuple(target.shape)}: expected {want} or [{', '.join(map(str, lead))}, {d}]")
    want_bias = (h, c) if weight.dim() == 3 else (c,)
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != want_bias):
        raise ValueError(f"bias must be a tensor {list(want_bias)} for weight {tuple(weight.shape)}, got "
                         f"{_shape(bias)}")
    for name, t in (("weight", weight), ("bias", bias), ("target", target)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")
    if c == 0:
        raise ValueError(f"weight {tuple(weight.shape)}: no classes (C == 0); expected C >= 1")
    if h == 0:
        raise ValueError(f"weight {tuple(weight.shape)}, hidden {tuple(hidden.shape)}: no heads (H == 0)")
    if not weight.is_floating_point():
        raise ValueError(f"weight must be a floating-point tensor, got {weight.dtype}")
    if hidden.dtype != weight.dtype and not torch.is_autocast_enabled(hidden.device.type):
        raise ValueError(f"hidden is {hidden.dtype} but weight is {weight.dtype}: give both one dtype (hidden.to("
                         "weight.dtype)), or run under torch.autocast")
    if shift_labels:
        if probs:
            raise ValueError("shift_labels=True takes class indices (the last position of a sequence is then "
                             "ignored); shift probability targets yourself")
        if target.dtype in (torch.uint8, torch.int8, torch.int16):
            target = target.long()
        # position t predicts label t + 1: the labels move left, the last position of each sequence is ignored
        target = torch.cat([target[..., 1:], target.new_full((*lead[:-1], 1), ignore_index)], dim=-1)
    n = math.prod(lead)
    hidden = hidden.reshape(h, n, d) if per_head else hidden.reshape(n, d)
    target = target.reshape(n, c) if probs else target.reshape(n)
    return hidden, weight, bias, target, lead


def _valid_rows(target: torch.Tensor, params: CollabLossParams) -> torch.Tensor:
    """[n] bool: the rows that count (every row of a probability target)."""
    if target.is_floating_point():
        return torch.ones(target.shape[0], dtype=torch.bool, device=target.device)
    return target != params.ignore_index


def _softcap(z: torch.Tensor, cap: float | None) -> torch.Tensor:
    return z if cap is None else cap * torch.tanh(z / cap)


def _z_loss(z: torch.Tensor, target: torch.Tensor, params: CollabLossParams, scale: float, dtype) -> torch.Tensor:
    """[H, n]: scale * logsumexp(z)^2 at the rows that count, 0 elsewhere."""
    lse = torch.logsumexp(z.to(dtype), dim=-1)
    return torch.where(_valid_rows(target, params), scale * lse.square(), torch.zeros((), dtype=dtype,
                                                                                     device=lse.device))


# ----------------------------------------------------------------------------------------------------
# Reference: the logits materialised, then the collaborative loss (autograd gives every gradient).
# ----------------------------------------------------------------------------------------------------


def linear_collab_loss_reference(hidden, weight, target, bias=None, *, softcap: float | None = None,
                                 lse_square_scale: float = 0.0, shift_labels: bool = False,
                                 return_stats: bool = False, reduction: str = "mean", **loss_kwargs):
    """fused_linear_collab_loss with the [H, N, C] logits materialised: collab_loss_reference(softcap(hidden @
    weight^T + bias), target, ...) plus the z-loss; every shape fused_linear_collab_loss takes."""
    params = CollabLossParams(**loss_kwargs, reduction=reduction)
    x, w, b, y, lead = _layout(hidden, weight, bias, target, shift_labels, params.ignore_index)
    z = _softcap(_logits(x, w, b), softcap)
    out = collab_loss_reference(z, y, reduction="none", return_stats=return_stats, **loss_kwargs)
    per, stats = out if return_stats else (out, None)
    if lse_square_scale:
        per = per + _z_loss(z, y, params, lse_square_scale, per.dtype)
    if reduction == "none":
        loss = per.reshape(per.shape[0], *lead)
    elif reduction == "sum":
        loss = per.sum()
    else:
        loss = per.sum() / _valid_rows(y, params).sum().clamp(min=1).to(per.dtype)
    return (loss, stats) if return_stats else loss


def _num_heads(hidden: torch.Tensor, weight: torch.Tensor) -> int:
    return weight.shape[0] if weight.dim() == 3 else hidden.shape[0] if hidden.dim() == 3 else 1


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """[H, n, C], rows contiguous. hidden [H, n, D] or [n, D] (shared); weight [H, C, D] or [C, D] (shared)."""
    if weight.dim() == 2:  # one output layer: [H, n, D] @ [D, C] folds into one GEMM
        z = torch.matmul(hidden if hidden.dim() == 3 else hidden.unsqueeze(0), weight.t())
    else:
        # A shared hidden is expanded (a stride-0 batch, no copy): broadcasting [1, n, D] instead lets matmul
        # return the logits transposed (n innermost), which the loss kernel would read with strided loads.
        x = hidden if hidden.dim() == 3 else hidden.unsqueeze(0).expand(weight.shape[0], -1, -1)
        z = torch.matmul(x, weight.transpose(1, 2))
    return z if bias is None else z + (bias.unsqueeze(1) if bias.dim() == 2 else bias)


def _accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc [(H,) P, Q] (float32 or float64) += a [(H,) P, K] @ b [(H,) K, Q], a and b in any float dtype. On
    CUDA, 16-bit operands go through cuBLAS with an output of acc's dtype that is acc itself (beta = 1): one
    pass over acc and no rounded temporaries. Elsewhere the product is formed and added."""
    batched = acc.dim() == 3
    if a.dtype == acc.dtype:
        (acc.baddbmm_ if batched else acc.addmm_)(a, b)
    elif acc.is_cuda and _HAS_OUT_DTYPE:
        (torch.baddbmm if batched else torch.addmm)(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc += torch.matmul(a, b).to(acc.dtype)


def _scaled(g: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """g * s in dtype, rounded once, with no full-size temporary in g's dtype (the weight's gradient of an LM
    head is gigabytes)."""
    return torch.mul(g, s, out=torch.empty_like(g, dtype=dtype))


def _has_out_dtype() -> bool:
    # baddbmm / addmm with out_dtype (recent torch; CUDA kernels only)
    try:
        return all("out_dtype" in str(op.dtype_out._schema) for op in (torch.ops.aten.baddbmm, torch.ops.aten.addmm))
    except (AttributeError, RuntimeError):
        return False


_HAS_OUT_DTYPE = _has_out_dtype()


# ----------------------------------------------------------------------------------------------------
# One chunk: logits, per-row loss and dL/dz weighted by r, then the three gradients.
# ----------------------------------------------------------------------------------------------------


def _stat_sums(hard, soft, correct, num_valid) -> torch.Tensor:
    """[4, H] float32 sums over a chunk (hard and soft come as means over its counted rows)."""
    n = num_valid.float().reshape(()).expand(hard.shape[0])
    d = n.clamp(min=1)
    return torch.stack([hard.float() * d, soft.float() * d, correct.float(), n])


def _autograd_on():
    """Autograd back on for the reference path's chunk gradient inside the custom op (torch.compile), whose
    implementation runs with autograd's dispatch keys excluded, where enable_grad alone records nothing."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for name in ("AutogradFunctionality", "AutogradOther", "ADInplaceOrView"):
        key = getattr(torch._C.DispatchKey, name, None)
        if key is not None:
            exclude = exclude.remove(key)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)


def _chunk_loss_and_grad(z: torch.Tensor, y: torch.Tensor, params: CollabLossParams, extras: _LinearExtras,
                         r: torch.Tensor, use_kernel: bool, want_stats: bool, sf: torch.Tensor | None):
    """(per-row loss [H, n] (0 at ignored rows), r * dL/dz [H, n, C], stat sums [4, H] or None). sf: the
    soft coefficient's factor (fp32 [] on the device) or None."""
    if not use_kernel:
        with _autograd_on(), torch.enable_grad():
            zc = z.detach().requires_grad_()
            zz = _softcap(zc, extras.softcap)
            out = reference(zz, y, replace(params, reduction="none"), want_stats, sf)  # [H, n]
            per, st = out if want_stats else (out, None)
            if extras.z_loss:
                per = per + _z_loss(zz, y, params, extras.z_loss, per.dtype)
            (g,) = torch.autograd.grad((per * r.to(per.dtype)).sum(), zc)
        return per.detach(), g, None if st is None else _stat_sums(*st)
    if extras.softcap is None and not extras.z_loss:
        sums = _kernel_stat_sums(z, y, params) if want_stats else None
        # one launch: loss and gradient, the gradient written over the logits (they are not needed after)
        loss, _, g, _ = launch(z, y, params, compute_loss=True, compute_grad=True, row_weights=r, grad_out=z,
                               soft_factor=sf)
        return loss, g, sums
    # Softcap and z-loss around the kernel, in float32: zc = cap tanh(z / cap), the kernel's loss and
    # gradient on zc, the z-loss's gradient 2 s lse r softmax(zc) added, then the cap's derivative 1 - tanh^2.
    zf = z.float()  # z itself when float32: a fresh product, ours to overwrite
    t = None
    if extras.softcap is not None:
        t = zf.div_(extras.softcap).tanh_()
        zc = t * extras.softcap
    else:
        zc = zf
    sums = _kernel_stat_sums(zc, y, params) if want_stats else None
    lse = torch.logsumexp(zc, dim=-1) if extras.z_loss else None
    loss, _, g, _ = launch(zc, y, params, compute_loss=True, compute_grad=True, row_weights=r,
                            grad_out=None if extras.z_loss else zc, soft_factor=sf)
    if extras.z_loss:
        valid = _valid_rows(y, params)
        zero = torch.zeros((), device=zc.device)
        loss = loss + torch.where(valid, extras.z_loss * lse.square(), zero)
        coef = torch.where(valid, 2.0 * extras.z_loss * lse * r.float(), zero)  # [H, n]
        g.addcmul_(zc.sub_(lse.unsqueeze(-1)).exp_(), coef.unsqueeze(-1))  # zc becomes softmax(zc)
    if t is not None:
        g.mul_(t.square_().neg_().add_(1.0))
    return loss, g, sums


def _kernel_stat_sums(z: torch.Tensor, y: torch.Tensor, params: CollabLossParams) -> torch.Tensor:
    # a launch of its own (the gradient launch overwrites the logits): one more read of the chunk's logits
    _, st, _, _ = launch(z, y, replace(params, reduction="sum"), return_stats=True)
    return _stat_sums(st[0], st[1], st[2], st[3, 0])


def _sweep(hidden, weight, bias, target, params, extras, r_of, chunk, use_kernel, want_grads, want_stats=False,
           sf=None):
    """Runs every chunk. r_of(lo, hi) -> upstream weights [H, hi - lo]. Returns (the per-row losses [H, N],
    grads (hidden, weight, bias) or Nones, stat sums [4, H] or None)."""
    n = target.shape[0]
    shared = hidden.dim() == 2
    heads = _num_heads(hidden, weight)
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    losses, sums = [], None
    gx = torch.empty_like(hidden) if want_grads and hidden.requires_grad else None
    gw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_grads and weight.requires_grad else None
    gb = torch.zeros(bias.shape, dtype=acc, device=bias.device) if want_grads and bias is not None \
        and bias.requires_grad else None
    for lo in range(0, n, chunk):
        hi = min(lo + chunk, n)
        x = hidden[lo:hi] if shared else hidden[:, lo:hi]
        z = _logits(x, weight, bias)
        if use_kernel and z.dtype not in KERNEL_DTYPES:
            z = z.float()
        loss, g, st = _chunk_loss_and_grad(z, target[lo:hi], params, extras, r_of(lo, hi), use_kernel, want_stats,
                                           sf)
        losses.append(loss)
        if st is not None:
            sums = st if sums is None else sums + st
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
            xs = x.unsqueeze(0).expand(heads, -1, -1) if shared else x
            if weight.dim() == 3:
                _accumulate(gw, g.transpose(1, 2), xs.to(g.dtype))  # [H, C, D]
            else:  # one layer for every head: the heads' rows are one reduction dimension
                _accumulate(gw, g.reshape(-1, g.shape[-1]).t(), xs.reshape(-1, xs.shape[-1]).to(g.dtype))
        if gb is not None:
            gb += (g.sum(1) if bias.dim() == 2 else g.sum((0, 1))).to(acc)
    per_row = torch.cat(losses, dim=1) if losses else hidden.new_zeros(
        (heads, 0), dtype=torch.float64 if hidden.dtype == torch.float64 and not use_kernel else torch.float32)
    if want_stats and sums is None:
        sums = torch.zeros((4, heads), device=hidden.device)
    return per_row, (gx, gw, gb), sums


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


def _forward(hidden, weight, bias, target, params, extras, chunk, use_kernel, return_stats, want_grads, sf):
    """(loss, stat sums [4, H] or None, gradients for grad_output 1 ("mean"/"sum"; Nones for "none"))."""
    heads, n = _num_heads(hidden, weight), target.shape[0]
    if params.reduction == "none":
        ones = torch.ones((), device=hidden.device).expand(heads, n)
        with torch.no_grad():
            per_row, _, sums = _sweep(hidden, weight, bias, target, params, extras, lambda lo, hi: ones[:, lo:hi],
                                      chunk, use_kernel, want_grads=False, want_stats=return_stats, sf=sf)
        return per_row, sums, (None, None, None)
    dtype = _loss_dtype(hidden, use_kernel)
    one = torch.ones((), dtype=dtype, device=hidden.device)
    scale = one / num_valid(target, params).clamp(min=1).to(dtype) if params.reduction == "mean" else one
    r = scale.expand(heads, max(n, 1))
    with torch.no_grad():
        per_row, grads, sums = _sweep(hidden, weight, bias, target, params, extras, lambda lo, hi: r[:, : hi - lo],
                                      chunk, use_kernel, want_grads=want_grads, want_stats=return_stats, sf=sf)
    return per_row.sum() * scale, sums, grads


def _backward_none(hidden, weight, bias, target, grad_out, params, extras, chunk, use_kernel, sf):
    """reduction "none": a second sweep with the upstream gradient [H, N] as the rows' weights."""
    go = grad_out if grad_out.dtype == torch.float64 else grad_out.float()
    with torch.no_grad():
        _, (gx, gw, gb), _ = _sweep(hidden, weight, bias, target, params, extras, lambda lo, hi: go[:, lo:hi], chunk,
                                    use_kernel, want_grads=True, sf=sf)
    return gx, None if gw is None else gw.to(weight.dtype), None if gb is None else gb.to(weight.dtype)


def _refuse_double_backward() -> None:
    if torch.is_grad_enabled():  # create_graph=True: the gradients below are computed without a graph
        raise RuntimeError(
            "fused_linear_collab_loss: double backward (create_graph=True, e.g. a gradient penalty) is not "
            "supported: its gradients are computed chunk by chunk, outside autograd; use "
            "linear_collab_loss_reference (the logits materialised) for it")


class _FusedLinearCollabLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, target, params: CollabLossParams, extras: _LinearExtras, chunk: int,
                use_kernel: bool, return_stats: bool, soft_factor: torch.Tensor | None):
        ctx.params, ctx.extras, ctx.chunk, ctx.use_kernel = params, extras, chunk, use_kernel
        ctx.weight_dtype = weight.dtype
        loss, sums, grads = _forward(hidden, weight, bias, target, params, extras, chunk, use_kernel, return_stats,
                                     any(ctx.needs_input_grad[:3]), soft_factor)
        if params.reduction == "none":
            # soft_factor saved: changed in place before backward, it is refused there (version check)
            ctx.save_for_backward(hidden, weight, bias, target, soft_factor)
        else:
            ctx.save_for_backward(*grads)
        stats = sums if sums is not None else loss.new_empty(0)
        ctx.mark_non_differentiable(stats)
        ctx.set_materialize_grads(False)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_out, _grad_stats):
        if grad_out is None:
            return (None,) * 10
        _refuse_double_backward()
        if ctx.params.reduction == "none":
            hidden, weight, bias, target, soft_factor = ctx.saved_tensors
            gx, gw, gb = _backward_none(hidden, weight, bias, target, grad_out, ctx.params, ctx.extras, ctx.chunk,
                                        ctx.use_kernel, soft_factor)
        else:
            gx, gw, gb = ctx.saved_tensors
            s = grad_out if grad_out.dtype == torch.float64 else grad_out.float()
            gx = None if gx is None else _scaled(gx, s, gx.dtype)
            gw = None if gw is None else _scaled(gw, s, ctx.weight_dtype)
            gb = None if gb is None else _scaled(gb, s, ctx.weight_dtype)
        return gx, gw, gb, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------------
# torch.library custom ops: what torch.compile sees (opaque, with fake implementations), so that a compiled
# model's graph holds the whole loss with no break (fullgraph=True). Eager calls take the Function above.
# Absent gradients travel as empty tensors (an op returns no None); softcap None as 0.
# ----------------------------------------------------------------------------------------------------


def _op_params(params: CollabLossParams, extras: _LinearExtras) -> tuple:
    return (*params_args(params), extras.softcap or 0.0, extras.z_loss)


def _from_op(temperature, hard_coef, soft_coef, detach_consensus, ignore_index, label_smoothing, reduction, block_c,
             soft_loss, softcap, z_loss):
    params = params_from(temperature, hard_coef, soft_coef, detach_consensus, ignore_index, label_smoothing,
                          reduction, block_c, soft_loss)
    return params, _LinearExtras(softcap=softcap or None, z_loss=z_loss)


def _loss_dtype(hidden: torch.Tensor, use_kernel: bool) -> torch.dtype:
    return torch.float64 if hidden.dtype == torch.float64 and not use_kernel else torch.float32


@torch.library.custom_op("collab_fast::fused_linear_collab_loss_forward", mutates_args=())
def _forward_op(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
    temperature: float, hard_coef: float, soft_coef: float, detach_consensus: bool, ignore_index: int,
    label_smoothing: float, reduction: str, block_c: int, soft_loss: str, softcap: float, z_loss: float,
    chunk: int, use_kernel: bool, grad_hidden: bool, grad_weight: bool, grad_bias: bool, compute_dtype: torch.dtype,
    return_stats: bool, soft_factor: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, stat sums [4, H] or [0], then for "mean"/"sum" the gradients for grad_output 1 (hidden's in its
    dtype, weight's and bias's in the accumulator's) or [0] where not asked)."""
    params, extras = _from_op(temperature, hard_coef, soft_coef, detach_consensus, ignore_index, label_smoothing,
                              reduction, block_c, soft_loss, softcap, z_loss)
    h, w, b = _op_leaves(hidden, weight, bias, compute_dtype, grad_hidden, grad_weight, grad_bias)
    loss, stats, grads = _forward(h, w, b, target, params, extras, chunk, use_kernel, return_stats,
                                  grad_hidden or grad_weight or grad_bias, soft_factor)
    if grads[0] is not None:
        grads = (grads[0].to(hidden.dtype), *grads[1:])  # weight's and bias's are the accumulator's already
    # an op's outputs may not alias each other: a fresh empty tensor for each absent one
    return (loss, hidden.new_empty(0) if stats is None else stats, *[hidden.new_empty(0) if g is None else g
                                                                     for g in grads])


@_forward_op.register_fake
def _(hidden, weight, bias, target, temperature, hard_coef, soft_coef, detach_consensus, ignore_index,
      label_smoothing, reduction, block_c, soft_loss, softcap, z_loss, chunk, use_kernel, grad_hidden, grad_weight,
      grad_bias, compute_dtype, return_stats, soft_factor=None):
    heads, n = _num_heads(hidden, weight), target.shape[0]
    dtype = _loss_dtype(hidden, use_kernel)
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    loss = hidden.new_empty((heads, n) if reduction == "none" else (), dtype=dtype)
    stats = hidden.new_empty((4, heads) if return_stats else (0,), dtype=torch.float32)
    grads = reduction != "none"
    gx = torch.empty_like(hidden) if grads and grad_hidden else hidden.new_empty(0)
    gw = weight.new_empty(weight.shape, dtype=acc) if grads and grad_weight else hidden.new_empty(0)
    gb = bias.new_empty(bias.shape, dtype=acc) if grads and grad_bias and bias is not None else hidden.new_empty(0)
    if not return_stats:
        stats = hidden.new_empty(0)
    return loss, stats, gx, gw, gb


@torch.library.custom_op("collab_fast::fused_linear_collab_loss_backward", mutates_args=())
def _backward_op(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
    grad_out: torch.Tensor, temperature: float, hard_coef: float, soft_coef: float, detach_consensus: bool,
    ignore_index: int, label_smoothing: float, reduction: str, block_c: int, soft_loss: str, softcap: float,
    z_loss: float, chunk: int, use_kernel: bool, grad_hidden: bool, grad_weight: bool, grad_bias: bool,
    compute_dtype: torch.dtype, soft_factor: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """reduction "none": the gradients for grad_out [H, N] (a second sweep), in the inputs' dtypes; [0] where not
    asked."""
    params, extras = _from_op(temperature, hard_coef, soft_coef, detach_consensus, ignore_index, label_smoothing,
                              reduction, block_c, soft_loss, softcap, z_loss)
    h, w, b = _op_leaves(hidden, weight, bias, compute_dtype, grad_hidden, grad_weight, grad_bias)
    grads = _backward_none(h, w, b, target, grad_out, params, extras, chunk, use_kernel, soft_factor)
    return tuple(hidden.new_empty(0) if g is None else g.to(t.dtype) for g, t in zip(grads, (hidden, weight, bias)))


@_backward_op.register_fake
def _(hidden, weight, bias, target, grad_out, temperature, hard_coef, soft_coef, detach_consensus, ignore_index,
      label_smoothing, reduction, block_c, soft_loss, softcap, z_loss, chunk, use_kernel, grad_hidden, grad_weight,
      grad_bias, compute_dtype, soft_factor=None):
    return (torch.empty_like(hidden) if grad_hidden else hidden.new_empty(0),
            torch.empty_like(weight) if grad_weight else hidden.new_empty(0),
            torch.empty_like(bias) if grad_bias and bias is not None else hidden.new_empty(0))


def _op_leaves(hidden, weight, bias, compute_dtype, grad_hidden, grad_weight, grad_bias):
    """Leaves that ask for exactly the gradients the op was asked for, in the dtype autocast would have run the
    matmuls in: autocast does not reach into a custom op, so a float32 model under bf16 autocast is cast here
    (once per call, as autocast's own cast) rather than run in float32."""
    def leaf(t, grad):
        if t is None:
            return None
        if t.dtype == torch.float32 and compute_dtype in (torch.bfloat16, torch.float16):
            t = t.to(compute_dtype)
        return t.detach().requires_grad_(grad)

    return leaf(hidden, grad_hidden), leaf(weight, grad_weight), leaf(bias, grad_bias)


def _op_setup_context(ctx, inputs, output):
    hidden, weight, bias, target, *rest = inputs
    ctx.op_args = rest[:17]  # temperature ... compute_dtype (then return_stats, soft_factor)
    ctx.reduction, ctx.weight_dtype = rest[6], weight.dtype
    ctx.mark_non_differentiable(*output[1:])
    if ctx.reduction == "none":
        ctx.save_for_backward(hidden, weight, bias, target, rest[18])
    else:
        ctx.save_for_backward(*output[2:])


def _op_backward(ctx, grad_loss, *_):
    if ctx.reduction == "none":
        hidden, weight, bias, target, soft_factor = ctx.saved_tensors
        gx, gw, gb = torch.ops.collab_fast.fused_linear_collab_loss_backward(
            hidden, weight, bias, target, grad_loss, *ctx.op_args, soft_factor)
    else:
        gx, gw, gb = ctx.saved_tensors
        s = grad_loss if grad_loss.dtype == torch.float64 else grad_loss.float()
        gx, gw, gb = ((g * s).to(dt) if g.numel() else g
                      for g, dt in ((gx, gx.dtype), (gw, ctx.weight_dtype), (gb, ctx.weight_dtype)))
    grad_hidden, grad_weight, grad_bias = ctx.op_args[-4:-1]
    return (gx if grad_hidden else None, gw if grad_weight else None, gb if grad_bias else None) + (None,) * 20


torch.library.register_autograd("collab_fast::fused_linear_collab_loss_forward", _op_backward,
                                setup_context=_op_setup_context)


# ----------------------------------------------------------------------------------------------------
# Functional API
# ----------------------------------------------------------------------------------------------------


def _check_targets(target: torch.Tensor, num_classes: int, params: CollabLossParams) -> None:
    """Out-of-range labels, negative or non-finite probabilities: one line where the values can be read without
    a device sync (CPU, or COLLAB_FAST_CHECK_LABELS=1), as fused_collab_loss checks them; elsewhere the kernel
    makes the loss NaN."""
    if target.is_floating_point() and target.requires_grad:
        raise ValueError("target: the loss gives no gradient to a probability target; pass target.detach()")
    if not labels_checked_on_host(target) or target.numel() == 0:
        return
    if target.is_floating_point():
        bad = ~torch.isfinite(target) | (target < 0)
        if bool(bad.any()):
            i, j = (int(v) for v in bad.nonzero()[0])
            raise ValueError(f"target[{i}, {j}] = {float(target[i, j])}: probabilities must be finite and >= 0")
        return
    bad = (target != params.ignore_index) & ((target < 0) | (target >= num_classes))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"target[{i}] = {int(target[i])} is outside [0, {num_classes}) and is not ignore_index "
                         f"({params.ignore_index})")


def _check_options(chunk_size, memory_budget, softcap, lse_square_scale, shift_labels, return_stats) -> _LinearExtras:
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if memory_budget is not None and (isinstance(memory_budget, bool) or not isinstance(memory_budget, int)
                                      or memory_budget < 1):
        raise ValueError(f"memory_budget must be a positive number of bytes or None, got {memory_budget!r}")
    for name, value in (("shift_labels", shift_labels), ("return_stats", return_stats)):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r}")
    cap = None if softcap is None else check_number("softcap", softcap, 0.0, math.inf, lo_open=True)
    return _LinearExtras(softcap=cap, z_loss=check_number("lse_square_scale", lse_square_scale, 0.0, math.inf))


def fused_linear_collab_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    temperature: float = DEFAULT.temperature,
    beta: float | None = None,
    soft_weight: float | None = None,
    soft_loss: str = DEFAULT.soft_loss,
    weights: tuple[float, float] | None = None,
    detach_consensus: bool = DEFAULT.detach_consensus,
    ignore_index: int = DEFAULT.ignore_index,
    label_smoothing: float = DEFAULT.label_smoothing,
    reduction: str = DEFAULT.reduction,
    impl: str = DEFAULT.impl,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    softcap: float | None = None,
    lse_square_scale: float = 0.0,
    shift_labels: bool = False,
    return_stats: bool = False,
    soft_factor: torch.Tensor | None = None,
):
    """fused_collab_loss(hidden @ weight^T + bias, target, ...) without the [H, N, C] logits.

    Args:
        hidden: [H, N, D] / [H, B, T, D] each head's last hidden states, or [N, D] / [B, T, D] shared by every
            head (the target's shape tells which).
        weight: [H, C, D] each head's output layer (an lm-head per head), or [C, D] one shared by every head
            (then H comes from hidden); bias: [H, C] / [C] or None.
        target: [N] / [B, T] class indices (ignore_index marks rows that count for nothing), or [N, C] /
            [B, T, C] probabilities (every row counts).
        temperature ... reduction: as fused_collab_loss.
        impl: "auto" (the Triton kernel for float32/bfloat16/float16 CUDA tensors, else the reference, which
            keeps float64 end to end), "triton" or "torch".
        chunk_size: rows per chunk; None: the most rows whose working set (the kernel: the chunk's logits; the
            reference: about 11x them) fits memory_budget bytes.
        memory_budget: bytes of a chunk's working set, kept to when given. None: 256 MiB, raised to chunks of
            2048 rows (N if fewer) when the weight needs a gradient, so that the float32 weight gradient, which
            every chunk reads and writes once, is swept a few times, not dozens; capped where a chunk's logits
            would outgrow that gradient (H2 D2048 C128256 bf16: 2048 rows, 1 GiB of logits beside the 2 GiB
            gradient, instead of 523 rows).
        softcap: logits become softcap * tanh(logits / softcap) before the loss (None: off).
        lse_square_scale: the z-loss's factor: s * logsumexp(logits)^2 added per head and counted row (0: off).
        shift_labels: position t predicts label t + 1 (a causal LM's labels as Hugging Face shifts them).
        return_stats: also return CollabStats (per-head hard and soft loss, correct count, rows counted), at one
            more read of each chunk's logits on the kernel path.
        soft_factor: as fused_collab_loss's: a one-element float tensor on the inputs' device multiplying the soft
            objective's coefficient, read on the device (a per-step ramp that neither recompiles a compiled step
            nor needs a new CUDA graph); it must not change between forward and backward.
    Returns the loss (float32; float64 for float64 inputs): a scalar, or [H, N] / [H, B, T] for
    reduction="none"; with return_stats, (loss, CollabStats).
    """
    params = CollabLossParams(temperature=temperature, beta=beta, soft_weight=soft_weight,
                              detach_consensus=detach_consensus, ignore_index=ignore_index,
                              label_smoothing=label_smoothing, reduction=reduction, impl=impl, soft_loss=soft_loss,
                              weights=weights)
    extras = _check_options(chunk_size, memory_budget, softcap, lse_square_scale, shift_labels, return_stats)
    hidden, weight, bias, target, lead = _layout(hidden, weight, bias, target, shift_labels, ignore_index)
    dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) \
        else torch.promote_types(hidden.dtype, weight.dtype)
    use_kernel = impl == "triton" or (impl == "auto" and hidden.device.type == "cuda" and dtype in KERNEL_DTYPES)
    if use_kernel:
        check_triton_usable(hidden.device)
        if dtype not in KERNEL_DTYPES:
            raise TypeError(f"impl='triton' takes float32, bfloat16 or float16 inputs, got {dtype}; use impl='torch' "
                            "(or 'auto') for float64")
    if target.dtype in (torch.uint8, torch.int8, torch.int16):
        target = target.long()
    soft_factor = check_soft_factor(soft_factor, hidden, "hidden")
    heads, c = _num_heads(hidden, weight), weight.shape[-2]
    _check_targets(target, c, params)
    # bytes per logit of a chunk's working set: the kernel's gradient overwrites the logits (softcap and
    # z-loss: a float32 copy and one more buffer each); the reference's autograd graph holds about 11
    # logit-sized tensors (measured: 10.75x in fp32)
    size = torch.finfo(dtype).bits // 8
    esize = size * 11 if not use_kernel else \
        size + (4 * (1 + (extras.softcap is not None) + bool(extras.z_loss)) if extras.softcap or extras.z_loss else 0)
    wants_grad = torch.is_grad_enabled() and weight.requires_grad
    chunk = _pick_chunk(heads, target.shape[0], c, esize, chunk_size, memory_budget,
                        grad_bytes=weight.numel() * 4 if wants_grad else 0)
    if torch.compiler.is_compiling():
        grad = torch.is_grad_enabled()
        loss, stats, *_ = torch.ops.collab_fast.fused_linear_collab_loss_forward(
            hidden, weight, bias, target, *_op_params(params, extras), chunk, use_kernel,
            grad and hidden.requires_grad, grad and weight.requires_grad,
            grad and bias is not None and bias.requires_grad, dtype, return_stats, soft_factor)
    else:
        loss, stats = _FusedLinearCollabLoss.apply(hidden, weight, bias, target, params, extras, chunk, use_kernel,
                                                   return_stats, soft_factor)
    if reduction == "none":
        loss = loss.view(heads, *lead)
    if not return_stats:
        return loss
    hard, soft, correct, n = stats.unbind(0)
    d = n[0].clamp(min=1)
    return loss, CollabStats(hard=hard / d, soft=soft / d, correct=correct, num_valid=n[0])


# ----------------------------------------------------------------------------------------------------
# Module
# ----------------------------------------------------------------------------------------------------


class FusedLinearCollabLoss(nn.Module):
    """H output layers (weight [H, C, D], optional bias [H, C]) and the collaborative loss on their logits,
    fused: forward(hidden, target) -> loss, every shape fused_linear_collab_loss takes. `loss_kwargs`:
    fused_linear_collab_loss's settings (temperature, softcap, lse_square_scale, shift_labels, ...)."""

    def __init__(self, num_heads: int, in_features: int, num_classes: int, bias: bool = False,
                 chunk_size: int | None = None, memory_budget: int | None = None, **loss_kwargs):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_heads, num_classes, in_features))
        self.bias = nn.Parameter(torch.zeros(num_heads, num_classes)) if bias else None
        bound = 1.0 / math.sqrt(in_features)
        nn.init.uniform_(self.weight, -bound, bound)  # nn.Linear's default, per head
        self.chunk_size, self.memory_budget, self.loss_kwargs = chunk_size, memory_budget, loss_kwargs
        # the settings are checked now, not at the first forward
        linear = {k: loss_kwargs.pop(k) for k in ("softcap", "lse_square_scale", "shift_labels", "return_stats")
                  if k in loss_kwargs}
        CollabLossParams(**loss_kwargs)
        _check_options(chunk_size, memory_budget, linear.get("softcap"), linear.get("lse_square_scale", 0.0),
                       linear.get("shift_labels", False), linear.get("return_stats", False))
        loss_kwargs.update(linear)

    def forward(self, hidden: torch.Tensor, target: torch.Tensor, soft_factor: torch.Tensor | None = None):
        return fused_linear_collab_loss(hidden, self.weight, target, self.bias, chunk_size=self.chunk_size,
                                        memory_budget=self.memory_budget, soft_factor=soft_factor, **self.loss_kwargs)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The [H, N, C] logits (inference, small N; softcapped when softcap is set)."""
        return _softcap(_logits(hidden, self.weight, self.bias), self.loss_kwargs.get("softcap"))
