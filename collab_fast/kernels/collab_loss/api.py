"""The loss's public face: the input checks, `fused_collab_loss` (the functional API), `collab_loss` (the
same with settings validated once, in a CollabLossParams) and the nn.Module `CollabLoss`."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

from collab_fast.kernels.collab_loss.autograd import FusedCollabLoss
from collab_fast.kernels.collab_loss.launch import check_triton_usable
from collab_fast.kernels.collab_loss.params import DEFAULT, KERNEL_DTYPES, CollabLossParams, CollabStats
from collab_fast.kernels.collab_loss.reference import reference

__all__ = ["CollabLoss", "check_inputs", "check_soft_factor", "collab_loss", "fused_collab_loss", "labels_checked_on_host"]



def _stack_heads(logits) -> torch.Tensor:
    if isinstance(logits, torch.Tensor):
        if logits.dim() != 3:
            raise ValueError(f"logits must be a tensor [H, N, C] or a sequence of H tensors [N, C]; "
                             f"got a tensor of shape {tuple(logits.shape)}")
        return logits
    if not isinstance(logits, Sequence) or isinstance(logits, (str, bytes)):
        raise TypeError(f"logits must be a tensor [H, N, C] or a sequence of tensors [N, C], got {type(logits).__name__}")
    if len(logits) == 0:
        raise ValueError("logits: no heads (an empty sequence); pass at least one [N, C] tensor")
    for i, t in enumerate(logits):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"logits[{i}] must be a tensor [N, C], got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"logits[{i}] must be a tensor [N, C], got shape {tuple(t.shape)}")
        if t.shape != logits[0].shape or t.dtype != logits[0].dtype or t.device != logits[0].device:
            raise ValueError(
                f"logits: every head must have the same shape, dtype and device; head 0 is "
                f"{tuple(logits[0].shape)} {logits[0].dtype} {logits[0].device}, head {i} is "
                f"{tuple(t.shape)} {t.dtype} {t.device}")
    return torch.stack(list(logits))  # a copy: models should return one [H, N, C] tensor instead


def labels_checked_on_host(target: torch.Tensor) -> bool:
    # CPU tensors are checked eagerly (cheap, no device sync); CUDA tensors only when asked, since the
    # check reads a value back to the host. Unchecked labels (CUDA, or anything under torch.compile,
    # where the check would break the graph) are checked in the kernel: an out-of-range label makes
    # the loss NaN.
    # Nor inside a captured step (--cuda-graphs), where a read on the host is refused.
    if torch.compiler.is_compiling() or _capturing(target.device):
        return False
    return target.device.type == "cpu" or os.environ.get("COLLAB_FAST_CHECK_LABELS", "0") == "1"


def _capturing(device: torch.device) -> bool:
    """A CUDA graph capture on `device`'s stream, or the CPU's op tape recording (graphs.OpTape: a dispatch
    mode marked `captures`)."""
    if device.type == "cuda":
        return torch.cuda.is_current_stream_capturing()
    return any(getattr(mode, "captures", False) for mode in _get_current_dispatch_mode_stack())


def check_inputs(logits, target: torch.Tensor, params: CollabLossParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Tensor checks (the settings were checked when params was built). Returns (logits as [H, N, C], target
    as a type in which ignore_index and C compare without wrapping)."""
    logits = _stack_heads(logits)
    num_heads, n, c = logits.shape
    if num_heads == 0:
        raise ValueError("logits: no heads (H == 0); expected [H, N, C] with H >= 1")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be a floating-point tensor (float32, bfloat16, float16), got {logits.dtype}")
    if c == 0:
        raise ValueError("logits: no classes (C == 0); expected [H, N, C] with C >= 1")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be an integer tensor [N] (labels) or a floating-point tensor [N, C] "
                        f"(probabilities), got {type(target).__name__}")
    if target.is_floating_point():
        return logits, _check_probabilities(target, logits)
    if target.dtype == torch.bool or target.is_complex():
        raise TypeError(f"target must be an integer tensor [N] of class indices or a floating-point tensor [N, C] "
                        f"of probabilities, got dtype {target.dtype}")
    if target.dim() != 1 or target.shape[0] != n:
        raise ValueError(f"target must have shape [N] = [{n}] to match logits {tuple(logits.shape)}, "
                         f"got {tuple(target.shape)}")
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device} but logits are on {logits.device}")
    if target.dtype in (torch.uint8, torch.int8, torch.int16):
        # comparisons with ignore_index (-100) and C would wrap in these types: widen ([N], cheap)
        target = target.long()
    if labels_checked_on_host(target) and n > 0:
        bad = (target != params.ignore_index) & ((target < 0) | (target >= c))
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"target[{i}] = {int(target[i])} is outside [0, {c}) and is not ignore_index "
                             f"({params.ignore_index})")
    return logits, target


def _check_probabilities(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """A probability target [N, C] (mixup, cutmix, a teacher's distribution): shape, device, no gradient
    asked of it; on CPU (cheap, no device sync) finite and non-negative."""
    num_heads, n, c = logits.shape
    if target.dim() == 1 and target.shape[0] == n:
        raise TypeError(f"target: a floating-point target is probabilities [N, C] = [{n}, {c}]; class indices must "
                        f"be an integer tensor [N] (target.long()), got {target.dtype} of shape {tuple(target.shape)}")
    if target.shape != (n, c):
        raise ValueError(f"target: probabilities must have shape [N, C] = [{n}, {c}] to match logits "
                         f"{tuple(logits.shape)}, got {tuple(target.shape)}")
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device} but logits are on {logits.device}")
    if target.requires_grad:
        raise ValueError("target: the loss gives no gradient to a probability target; pass target.detach() (a "
                         "learnt target needs impl='torch' and its own graph)")
    if labels_checked_on_host(target) and n > 0:
        bad = ~torch.isfinite(target) | (target < 0)
        if bool(bad.any()):
            i, j = (int(v) for v in bad.nonzero()[0])
            raise ValueError(f"target[{i}, {j}] = {float(target[i, j])}: probabilities must be finite and >= 0")
    return target


def check_soft_factor(soft_factor, logits: torch.Tensor, name: str = "logits") -> torch.Tensor | None:
    """soft_factor as a float32 0-dim tensor on the logits' device (None stays None); its value is checked
    where that costs no device sync (CPU tensors, as the labels are)."""
    if soft_factor is None:
        return None
    if not isinstance(soft_factor, torch.Tensor):
        whose = name + ("'" if name.endswith("s") else "'s")
        raise TypeError(f"soft_factor must be a one-element float tensor on the {whose} device (a factor the "
                        f"device reads at each call), got {type(soft_factor).__name__}; for a constant factor scale "
                        "soft_weight or weights instead")
    if soft_factor.numel() != 1 or not soft_factor.is_floating_point():
        raise ValueError(f"soft_factor must be a one-element float tensor, got {soft_factor.dtype} of shape "
                         f"{tuple(soft_factor.shape)}")
    if soft_factor.device != logits.device:
        raise ValueError(f"soft_factor is on {soft_factor.device} but {name} is on {logits.device}")
    if soft_factor.requires_grad:
        raise ValueError("soft_factor: the loss gives it no gradient; pass soft_factor.detach()")
    if labels_checked_on_host(soft_factor):
        v = float(soft_factor)
        if not v - v == 0.0 or v < 0:
            raise ValueError(f"soft_factor must be finite and >= 0, got {v}")
    return soft_factor.reshape(()).to(torch.float32)


def collab_loss(logits, target: torch.Tensor, params: CollabLossParams, *, return_stats: bool = False,
                inplace: bool = False, soft_factor: torch.Tensor | None = None):
    """fused_collab_loss with its settings already validated in `params` (what CollabLoss calls)."""
    logits, target = check_inputs(logits, target, params)
    soft_factor = check_soft_factor(soft_factor, logits)
    if params.impl == "auto":
        use_kernel = logits.device.type == "cuda" and logits.dtype in KERNEL_DTYPES
    else:
        use_kernel = params.impl == "triton"
    if use_kernel:
        check_triton_usable(logits.device)
        if logits.dtype not in KERNEL_DTYPES:
            raise TypeError(f"impl='triton' takes float32, bfloat16 or float16 logits, got {logits.dtype}; "
                            "use impl='torch' for float64")
    if inplace and not use_kernel:
        raise ValueError("inplace=True needs the Triton kernel (impl='triton', or 'auto' on CUDA)")
    if inplace and torch._debug_has_internal_overlap(logits) != 0:
        # rows or heads sharing memory (expand, as_strided): the gradient written into one would overwrite another's
        raise ValueError("inplace=True: the logits' rows or heads share memory (an expanded or overlapping view), so "
                         "the gradient cannot be written into them; pass contiguous logits or inplace=False")
    if not use_kernel:
        return reference(logits, target, params, return_stats, soft_factor)
    loss, stats = FusedCollabLoss.apply(logits, target, params, return_stats, inplace, soft_factor)
    if not return_stats:
        return loss
    hard, soft, correct, counts = stats.unbind(0)  # one view op, not four
    return loss, CollabStats(hard=hard, soft=soft, correct=correct, num_valid=counts[0])


def fused_collab_loss(
    logits,
    target: torch.Tensor,
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
    return_stats: bool = False,
    inplace: bool = False,
    block_c: int | None = None,
    soft_factor: torch.Tensor | None = None,
):
    """Collaborative-learning loss of H heads (hard + consensus soft cross-entropy), fused.

    Args:
        logits: [H, N, C] float tensor (float32, bfloat16 or float16; any strides), or a sequence of H
            tensors [N, C] (stacked, which copies: prefer one [H, N, C] tensor).
        target: [N] integer class indices (``ignore_index`` marks samples that contribute nothing), or
            [N, C] floating-point probabilities (mixup/cutmix targets, a soft label): the hard objective is
            then -sum_c t_c log p_c (each row need not sum to 1: its gradient is p * sum(t) - t), every
            sample counts, ignore_index is unused, and the correct count compares the top classes. No
            gradient flows into the target.
        temperature: T > 0 of the soft objective.
        beta: weight of the hard objective in [0, 1] (None: 0.5); the soft one gets 1 - beta.
        soft_weight: extra factor on the soft objective; None means T**2 (the paper). The public
            TensorFlow code used 1.
        soft_loss: "ce": the soft objective is CE(q_h, p_h) (the paper); "kl": KL(q_h || p_h), which
            differs by the consensus entropy (the same gradient with a detached consensus; with a live
            one the entropy's gradient reaches the other heads).
        weights: (hard, soft) factors of the two objectives, replacing beta and soft_weight: e.g.
            CE + a T^2 KL is weights=(1, a * T**2), soft_loss="kl". With one head (H == 1) the loss is
            plain cross-entropy whatever the weights.
        detach_consensus: True: the consensus is a constant target. False: gradient also flows
            through it into the other heads.
        ignore_index: label value of ignored samples (they count in neither term nor in the mean).
        label_smoothing: eps in [0, 1] of the hard objective (torch's definition).
        reduction: "mean" (sum over heads of the mean over non-ignored samples), "sum", or "none"
            ([H, N], 0 at ignored samples).
        impl: "auto" (Triton on CUDA tensors, the reference on CPU), "triton", or "torch".
        return_stats: also return a CollabStats (per-head mean hard/soft loss and top-1 correct count),
            computed in the same pass with no host sync.
        inplace: backward writes the gradient into the logits' storage (saves one [H, N, C] buffer; the
            logits are destroyed by backward). Triton path only.
        block_c: column block of the kernel (a power of two in [16, 65536]); default picks one.
        soft_factor: a one-element float tensor on the logits' device multiplying the soft objective's
            coefficient, read on the device at each call (and again in backward, so it must not change in
            between): a per-step ramp that neither recompiles a torch.compile'd step nor needs a new CUDA
            graph. No gradient flows into it.

    Returns:
        The loss (float32, or float64 for float64 logits on the reference path; a scalar, or [H, N] for
        "none"), and a CollabStats if return_stats.

    Label values on CUDA tensors are checked in the kernel without a host sync: an out-of-range label
    makes the loss NaN. Set COLLAB_FAST_CHECK_LABELS=1 for an eager ValueError instead (one sync).
    The Triton path's gradient is not differentiable: create_graph=True through it raises.
    """
    params = CollabLossParams(temperature=temperature, beta=beta, soft_weight=soft_weight, soft_loss=soft_loss,
                              weights=weights, detach_consensus=detach_consensus, ignore_index=ignore_index,
                              label_smoothing=label_smoothing, reduction=reduction, impl=impl, block_c=block_c)
    return collab_loss(logits, target, params, return_stats=return_stats, inplace=inplace, soft_factor=soft_factor)


# ----------------------------------------------------------------------------------------------------
# Module
# ----------------------------------------------------------------------------------------------------


class CollabLoss(nn.Module):
    """nn.Module form of :func:`fused_collab_loss`: the settings (every keyword of fused_collab_loss but
    return_stats and inplace, which are per call) are validated once, here."""

    def __init__(self, temperature: float = DEFAULT.temperature, beta: float | None = None,
                 soft_weight: float | None = None, soft_loss: str = DEFAULT.soft_loss,
                 weights: tuple[float, float] | None = None, detach_consensus: bool = DEFAULT.detach_consensus,
                 ignore_index: int = DEFAULT.ignore_index, label_smoothing: float = DEFAULT.label_smoothing,
                 reduction: str = DEFAULT.reduction, impl: str = DEFAULT.impl, block_c: int | None = None):
        super().__init__()
        self.params = CollabLossParams(temperature=temperature, beta=beta, soft_weight=soft_weight,
                                       soft_loss=soft_loss, weights=weights, detach_consensus=detach_consensus,
                                       ignore_index=ignore_index, label_smoothing=label_smoothing,
                                       reduction=reduction, impl=impl, block_c=block_c)

    def forward(self, logits, target: torch.Tensor, return_stats: bool = False, inplace: bool = False,
                soft_factor: torch.Tensor | None = None):
        return collab_loss(logits, target, self.params, return_stats=return_stats, inplace=inplace,
                           soft_factor=soft_factor)

    def extra_repr(self) -> str:
        p = self.params
        weights = f"weights={p.weights}" if p.weights else f"beta={p.beta}, soft_weight={p.soft_weight}"
        return (f"temperature={p.temperature}, {weights}, soft_loss={p.soft_loss!r}, "
                f"detach_consensus={p.detach_consensus}, reduction={p.reduction!r}, impl={p.impl!r}")
