"""The loss as autograd sees it. Eager calls: `FusedCollabLoss`, an autograd.Function that launches the
kernel directly (no dispatcher cost). torch.compile: two torch.library Triton ops (`triton_op`, the forward
op's gradient registered): the compiler traces into them, so Inductor launches and captures the kernel
itself; under the Triton interpreter they are custom ops opaque to it."""

from __future__ import annotations

import torch

from collab_fast.kernels.collab_loss.jit import collab_loss_kernel
from collab_fast.kernels.collab_loss.launch import interpreter_active, launch, num_valid, row_stats_buffer
from collab_fast.kernels.collab_loss.params import CollabLossParams

__all__ = ["FusedCollabLoss", "params_args", "params_from", "upstream_weights"]


# ----------------------------------------------------------------------------------------------------
# torch.library ops: what torch.compile sees. With a compiled kernel they are Triton ops: AOTAutograd
# traces their bodies (buffers allocated with torch, the kernel through wrap_triton), so Inductor plans the
# buffers and launches the kernel in its own code, and a CUDA graph around it (mode="reduce-overhead",
# --cuda-graphs) holds the launch. The interpreter's kernel cannot be traced: there each is a custom op
# whose fake implementation is the same body (launch.traced_launch launches nothing on fake tensors).
# A schema takes no dataclass, so the params travel as their fields and are rebuilt (already validated
# values: no new checks fail). Eager calls go straight to launch, avoiding the dispatcher's overhead.
# ----------------------------------------------------------------------------------------------------


def _op(name: str):
    """Registers `fn` as the op `name`: a Triton op, or under the interpreter (or without Triton, where it
    cannot run) a custom op faked by itself."""
    def register(fn):
        if collab_loss_kernel is None or interpreter_active():
            op = torch.library.custom_op(name, fn, mutates_args=())
            op.register_fake(fn)
            return op
        return torch.library.triton_op(name, fn, mutates_args=())
    return register


def params_args(p: CollabLossParams) -> tuple:
    # The resolved coefficients travel (beta/soft_weight or weights alike): (hard_coef, soft_coef).
    return (p.temperature, p.hard_coef, p.soft_coef, p.detach_consensus, p.ignore_index, p.label_smoothing,
            p.reduction, p.block_c or 0, p.soft_loss)


def params_from(temperature, hard_coef, soft_coef, detach_consensus, ignore_index, label_smoothing, reduction,
                 block_c, soft_loss) -> CollabLossParams:
    return CollabLossParams(temperature=temperature, detach_consensus=detach_consensus, ignore_index=ignore_index,
                            label_smoothing=label_smoothing, reduction=reduction, impl="triton", block_c=block_c or None,
                            soft_loss=soft_loss, weights=(hard_coef, soft_coef))


@_op("collab_fast::collab_loss_forward")
def _collab_loss_forward_op(
    logits: torch.Tensor, target: torch.Tensor, temperature: float, hard_coef: float, soft_coef: float,
    detach_consensus: bool, ignore_index: int, label_smoothing: float, reduction: str, block_c: int,
    soft_loss: str, keep_row_stats: bool, return_stats: bool, soft_factor: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    params = params_from(temperature, hard_coef, soft_coef, detach_consensus, ignore_index, label_smoothing,
                          reduction, block_c, soft_loss)
    rs = row_stats_buffer(logits, target, params) if keep_row_stats else None
    loss, stats, _, _ = launch(logits, target, params, return_stats=return_stats, save_row_stats=rs,
                               soft_factor=soft_factor, traced=True)
    empty = logits.new_empty((0,), dtype=torch.float32)
    return loss, (stats if stats is not None else empty), (rs if rs is not None else empty.clone())


@_op("collab_fast::collab_loss_backward_rows")
def _collab_loss_backward_rows_op(
    logits: torch.Tensor, target: torch.Tensor, row_weights: torch.Tensor, row_stats: torch.Tensor,
    temperature: float, hard_coef: float, soft_coef: float, detach_consensus: bool, ignore_index: int,
    label_smoothing: float, reduction: str, block_c: int, soft_loss: str, soft_factor: torch.Tensor | None = None,
) -> torch.Tensor:
    params = params_from(temperature, hard_coef, soft_coef, detach_consensus, ignore_index, label_smoothing,
                          reduction, block_c, soft_loss)
    _, _, grad, _ = launch(logits, target, params, compute_loss=False, compute_grad=True, row_weights=row_weights,
                           row_stats=row_stats if row_stats.numel() else None, soft_factor=soft_factor, traced=True)
    return grad


# ----------------------------------------------------------------------------------------------------
# Autograd: forward reads the logits once for the loss (and statistics); backward launches the kernel
# again with the upstream weights r [H, N] read on the device (grad_output / n_valid for "mean", a
# stride-0 view of the scalar), so the gradient is written once, already scaled: no stored [H, N, C]
# gradient between forward and backward, no extra multiply pass, no host sync. Rows longer than one
# block: forward keeps pass 1's statistics (fp32 [9, H, N], 36 bytes a row and head), so backward reads
# each row once too.
# ----------------------------------------------------------------------------------------------------


def upstream_weights(grad_loss: torch.Tensor, target: torch.Tensor, params: CollabLossParams, shape) -> torch.Tensor:
    """r [H, N] of the gradient formula from the loss's grad_output, without a host sync."""
    if params.reduction == "none":
        return grad_loss
    r = grad_loss.float()
    if params.reduction == "mean":
        r = r / num_valid(target, params).clamp_min(1)
    return r.expand(shape)  # strides (0, 0): every row reads the same scalar


def _forward_op_setup_context(ctx, inputs, output):
    logits, target, *params_args = inputs
    ctx.params_args = params_args[:9]  # temperature ... soft_loss; keep_row_stats, return_stats left out
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.save_for_backward(logits, target, output[2], params_args[11])  # the last: soft_factor (or None)


def _forward_op_backward(ctx, grad_loss, _grad_stats, _grad_row_stats):
    # The op's own gradient (what opcheck and AOTAutograd differentiate): the kernel's gradient pass. The
    # gradient op itself is not differentiable (no double backward through the Triton kernel).
    logits, target, rs, soft_factor = ctx.saved_tensors
    params = params_from(*ctx.params_args)
    r = upstream_weights(grad_loss, target, params, logits.shape[:2])
    grad = torch.ops.collab_fast.collab_loss_backward_rows(logits, target, r, rs, *ctx.params_args, soft_factor)
    return (grad,) + (None,) * 13


torch.library.register_autograd("collab_fast::collab_loss_forward", _forward_op_backward,
                                setup_context=_forward_op_setup_context)


class FusedCollabLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, params: CollabLossParams, return_stats, inplace, soft_factor):
        compiling = torch.compiler.is_compiling()
        needs_grad = ctx.needs_input_grad[0]
        counts = None
        if compiling:
            if inplace:
                raise NotImplementedError("fused_collab_loss(inplace=True) is not supported under torch.compile")
            loss, stats, rs = torch.ops.collab_fast.collab_loss_forward(
                logits, target, *params_args(params), needs_grad, return_stats, soft_factor)
        else:
            rs = row_stats_buffer(logits, target, params) if needs_grad else None
            loss, stats, _, counts = launch(logits, target, params, return_stats=return_stats, save_row_stats=rs,
                                            soft_factor=soft_factor)
        # forward's [5, H] stats buffer holds n_valid in a row of its own ([4, 0]): backward's kernel divides
        # grad_output by it (no ATen op). Kept on ctx, not saved: the stats returned are a view of its first four
        # rows, which a caller may modify in place without touching the count.
        ctx.params, ctx.compiling, ctx.inplace, ctx.counts = params, compiling, inplace, counts
        if needs_grad:
            # soft_factor saved too: changed in place before backward, it is refused there (version check)
            ctx.save_for_backward(logits, target, rs, soft_factor)
        if stats is None:
            stats = loss.new_empty(0)
        ctx.mark_non_differentiable(stats)
        ctx.set_materialize_grads(False)  # no zeros made for the stats' (absent) gradient
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        if grad_loss is None:
            return None, None, None, None, None, None
        if torch.is_grad_enabled():  # create_graph=True: a gradient of this gradient was asked for
            raise RuntimeError(
                "fused_collab_loss: double backward (create_graph=True, e.g. a gradient penalty) is not "
                "supported by the Triton kernel, whose gradient is not differentiable; use impl='torch' for it")
        params = ctx.params
        logits, target, rs, soft_factor = ctx.saved_tensors
        if ctx.compiling:
            r = upstream_weights(grad_loss, target, params, logits.shape[:2])
            grad = torch.ops.collab_fast.collab_loss_backward_rows(logits, target, r, rs, *params_args(params),
                                                                   soft_factor)
        else:
            _, _, grad, _ = launch(logits, target, params, compute_loss=False, compute_grad=True,
                                    row_weights=grad_loss, counts=ctx.counts, grad_out=logits if ctx.inplace else None,
                                    row_stats=rs, soft_factor=soft_factor)
            if ctx.inplace:
                # The logits now hold the gradient: any other node that saved them must refuse to run.
                torch.autograd.graph.increment_version(logits)
        return grad, None, None, None, None, None
