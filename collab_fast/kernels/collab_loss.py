"""Fused collaborative-learning loss: every head's hard + soft loss in one pass (forward), its gradient,
scaled by grad_output on the device, in one more (backward).

Math (Song & Chai 2018, eq. 2-4). One sample, label y, heads z_1..z_H in R^C, temperature T,
weight beta, soft weight w (default T^2), label smoothing eps; C' = number of finite classes:

    hard_h = lse(z_h) - (1 - eps) z_h[y] - eps * sum_{i finite} z_h,i / C'      (torch's smoothing)
    or, for a target distribution t (mixup, cutmix; rows summing to S = sum_i t_i, usually 1):
    hard_h = (1 - eps) (S lse(z_h) - <t, z_h>) + eps (lse(z_h) - sum_{i finite} z_h,i / C')
    c_h    = (sum_{j != h} z_j) / (H - 1)                 leave-one-out consensus of the other heads
    a_h    = z_h / T,  u_h = c_h / T,  p_h = softmax(a_h),  q_h = softmax(u_h)
    soft_h = -sum_i q_h,i log p_h,i = lse(a_h) - <q_h, a_h>                  (soft_loss="ce")
    soft_h = sum_i q_h,i (log q_h,i - log p_h,i) = CE - ent(q_h),             (soft_loss="kl")
             ent(q_h) = lse(u_h) - <q_h, u_h>
    L_h    = k_hard hard_h + k_soft soft_h                (H = 1: L_1 = hard_1, plain cross-entropy)
             k_hard = beta, k_soft = (1 - beta) w;  or free:  (k_hard, k_soft) = weights

    loss = sum_h mean_{n not ignored} L_h(n)   ("mean"; "sum" sums over n; "none" gives [H, N])

Gradient, with r_h the upstream weight of L_h (1/n_valid for "mean", 1 for "sum", grad_output[h, n]
for "none"):

    dz_j  = r_j [k_hard (softmax(z_j) - (1 - eps) e_y - eps 1_finite / C') + k_soft (p_j - q_j) / T]
  (a distribution t: softmax(z_j) ((1 - eps) S + eps) - (1 - eps) t in place of softmax(z_j) - (1 - eps) e_y),
  (the same for "ce" and "kl": ent(q_j) does not depend on z_j), and when the consensus is not detached,
  soft_h (h != j) also reaches z_j through u_h:
    g_h   = d soft_h / d z_j = -q_h * (b_h - <q_h, b_h>) / (T (H - 1))        (same for every j != h)
            b_h = a_h ("ce"), or a_h - u_h ("kl": the entropy's gradient flows into the other heads too)
    dz_j += k_soft (G - r_j g_j),  G = sum_h r_h g_h

A class whose logit is -inf is absent: it gets probability 0 and gradient 0, and the loss equals the
loss computed without it (C' counts only finite classes). A class masked in another head is absent
from this head's consensus.

Layout of this file: reference (plain PyTorch), Triton kernel, launcher, torch.library custom ops
(for torch.compile), autograd Function, functional API, nn.Module.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
from torch import nn

from collab_fast.cli import opt
from collab_fast.kernels.launch import CachedLauncher

try:  # Triton is a dependency, but keep impl="torch" usable where it cannot be imported.
    import triton
    import triton.language as tl

    _TRITON_IMPORT_ERROR: Exception | None = None
except Exception as exc:  # pragma: no cover - exercised only on machines without triton
    triton = None
    tl = None
    _TRITON_IMPORT_ERROR = exc

__all__ = [
    "CollabLoss",
    "CollabLossParams",
    "CollabStats",
    "collab_loss_reference",
    "fused_collab_loss",
]

_REDUCTIONS = ("mean", "sum", "none")
_SOFT_LOSSES = ("ce", "kl")
_IMPLS = ("auto", "triton", "torch")
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_BLOCK_C = 2**16  # a larger column block does not fit Triton's per-tensor limit with several heads


class CollabStats(NamedTuple):
    """Per-head training statistics computed in the same pass as the loss (all on the logits' device)."""

    hard: torch.Tensor  # [H] mean hard (cross-entropy) loss over non-ignored samples
    soft: torch.Tensor  # [H] mean soft (consensus) loss over non-ignored samples; 0 when H == 1
    correct: torch.Tensor  # [H] number of non-ignored samples whose top-1 prediction is the label
    num_valid: torch.Tensor  # [] number of non-ignored samples (float32)


@dataclass(frozen=True)
class CollabLossParams:
    """The loss's settings, validated once (at construction) and carried as one value from the API
    through the autograd Function and the custom ops to the launcher. See fused_collab_loss."""

    # The fields with `opt` metadata are the trainer's `loss` section too (collab_fast.config): their
    # defaults here are the only ones; flags, config.json and fused_collab_loss's signature take them.
    temperature: float = opt(2.0, "T of the soft (consensus) objective", lo=0, hi=1e4, lo_open=True)
    beta: float | None = opt(None, "weight of the hard (label) objective; the soft one gets 1 - beta; unset: 0.5 "
                                   "(or unused, with --loss-weights)", lo=0, hi=1)
    soft_weight: float | None = opt(None, "extra factor on the soft objective; unset: T^2 (the paper)", lo=0)
    detach_consensus: bool = opt(True, "the consensus is a constant target (no gradient through it)")
    ignore_index: int = -100
    label_smoothing: float = opt(0.0, "label smoothing of the hard objective (torch's definition)", lo=0, hi=1)
    reduction: str = "mean"
    impl: str = "auto"
    block_c: int | None = None
    soft_loss: str = opt("ce", "soft objective: ce = CE(consensus, head) as in the paper, kl = KL(consensus || "
                               "head) as several public implementations write it", choices=_SOFT_LOSSES)
    weights: tuple[float, float] | None = opt(None, "free factors of the hard and the soft objective, replacing "
                                                    "--beta and --soft-weight (e.g. 1,4 for CE + 4 KL)", lo=0,
                                              metavar="HARD,SOFT", name="loss_weights")

    def __post_init__(self):
        put = lambda k, v: object.__setattr__(self, k, v)
        put("temperature", _check_number("temperature", self.temperature, 0.0, math.inf, lo_open=True))
        if self.weights is not None:
            if self.beta is not None or self.soft_weight is not None:
                raise ValueError("weights=(hard, soft) replaces beta and soft_weight: give either weights or "
                                 "beta/soft_weight, not both")
            w = self.weights
            if not isinstance(w, (tuple, list)) or len(w) != 2:
                raise ValueError(f"weights must be a pair (hard, soft) of numbers >= 0, got {w!r}")
            put("weights", (_check_number("weights[0] (hard)", w[0], 0.0, math.inf),
                            _check_number("weights[1] (soft)", w[1], 0.0, math.inf)))
        else:
            put("beta", 0.5 if self.beta is None else _check_number("beta", self.beta, 0.0, 1.0))
            if self.soft_weight is None and self.temperature > 1e150:  # T^2 would overflow a float
                raise ValueError(f"temperature {self.temperature:g}: the default soft_weight T^2 overflows; pass "
                                 "soft_weight (or weights), or a smaller temperature")
            put("soft_weight", self.temperature**2 if self.soft_weight is None
                else _check_number("soft_weight", self.soft_weight, 0.0, math.inf))
        if self.soft_loss not in _SOFT_LOSSES:
            raise ValueError(f"soft_loss must be one of {_SOFT_LOSSES}, got {self.soft_loss!r}")
        put("label_smoothing", _check_number("label_smoothing", self.label_smoothing, 0.0, 1.0))
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {type(self.ignore_index).__name__}")
        if not -(2**63) <= self.ignore_index < 2**63:
            raise ValueError(f"ignore_index must fit in int64, got {self.ignore_index}")
        if self.reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {self.reduction!r}")
        if self.impl not in _IMPLS:
            raise ValueError(f"impl must be one of {_IMPLS}, got {self.impl!r}")
        if not isinstance(self.detach_consensus, bool):
            raise TypeError(f"detach_consensus must be a bool, got {type(self.detach_consensus).__name__}")
        if self.block_c is not None:
            b = self.block_c
            if isinstance(b, bool) or not isinstance(b, int) or not 16 <= b <= _MAX_BLOCK_C or b & (b - 1):
                raise ValueError(f"block_c must be a power of two in [16, {_MAX_BLOCK_C}], got {b!r}")

    @property
    def hard_coef(self) -> float:
        """The factor on the hard objective: beta, or weights[0]."""
        return self.weights[0] if self.weights is not None else self.beta

    @property
    def soft_coef(self) -> float:
        """The factor on the soft objective: (1 - beta) * soft_weight, or weights[1]."""
        return self.weights[1] if self.weights is not None else (1.0 - self.beta) * self.soft_weight

    def with_soft_factor(self, factor: float) -> CollabLossParams:
        """These settings with the soft objective's coefficient times `factor` (a soft-weight ramp)."""
        return replace(self, beta=None, soft_weight=None, weights=(self.hard_coef, self.soft_coef * factor))


def _check_number(name: str, value, lo: float, hi: float, lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    # v - v == 0 is false exactly for inf and nan; math.isfinite breaks a torch.compile(dynamic=True) graph.
    if not v - v == 0.0 or v < lo or v > hi or (lo_open and v == lo):
        interval = f"{'(' if lo_open else '['}{lo}, {hi}]".replace("inf]", "inf)")
        raise ValueError(f"{name} must be a finite number in {interval}, got {value}")
    return v


_DEFAULT = CollabLossParams()  # the defaults, for the signatures of fused_collab_loss and CollabLoss


# ----------------------------------------------------------------------------------------------------
# Reference: plain PyTorch composition (autograd gives the gradient). Computes in float32, or float64
# when the logits are float64 (the tests' ground truth).
# ----------------------------------------------------------------------------------------------------


def collab_loss_reference(
    logits: torch.Tensor,
    target: torch.Tensor,
    temperature: float = _DEFAULT.temperature,
    beta: float | None = None,
    soft_weight: float | None = None,
    detach_consensus: bool = _DEFAULT.detach_consensus,
    ignore_index: int = _DEFAULT.ignore_index,
    label_smoothing: float = _DEFAULT.label_smoothing,
    reduction: str = _DEFAULT.reduction,
    return_stats: bool = False,
    soft_loss: str = _DEFAULT.soft_loss,
    weights: tuple[float, float] | None = None,
):
    """The collaborative loss as a composition of PyTorch ops. logits [H, N, C], target [N]."""
    params = CollabLossParams(temperature, beta, soft_weight, detach_consensus, ignore_index, label_smoothing,
                              reduction, "torch", None, soft_loss, weights)
    return _reference(logits, target, params, return_stats)


def _reference(logits: torch.Tensor, target: torch.Tensor, params: CollabLossParams, return_stats: bool = False):
    num_heads, n, _ = logits.shape
    p = params
    z = logits if logits.dtype == torch.float64 else logits.float()
    finite = z > float("-inf")  # [H, N, C]; -inf marks an absent class
    logp = torch.log_softmax(z, dim=-1)
    if target.is_floating_point():  # probabilities [N, C]: every sample counts
        t = target.to(z.dtype)
        valid = torch.ones(n, dtype=torch.bool, device=z.device)
        y = t.argmax(-1)  # the target's top class, for the correct count
        nll = -(t * logp.masked_fill(t == 0, 0.0)).sum(-1)  # [H, N]; 0 log 0 = 0 at absent classes
    else:
        valid = target != p.ignore_index  # [N]
        y = torch.where(valid, target, torch.zeros_like(target)).long()
        nll = -logp.gather(-1, y.view(1, n, 1).expand(num_heads, n, 1)).squeeze(-1)  # [H, N]
    if p.label_smoothing > 0:
        smooth = -logp.masked_fill(~finite, 0.0).sum(-1) / finite.sum(-1)
        hard = (1.0 - p.label_smoothing) * nll + p.label_smoothing * smooth
    else:
        hard = nll

    if num_heads == 1:
        soft = torch.zeros_like(hard)
        per = hard
    else:
        zf = z.masked_fill(~finite, 0.0)
        consensus = (zf.sum(0, keepdim=True) - zf) / (num_heads - 1)  # [H, N, C]
        masked = (~finite).int()
        consensus = consensus.masked_fill((masked.sum(0, keepdim=True) - masked) > 0, float("-inf"))
        if p.detach_consensus:
            consensus = consensus.detach()
        logq = torch.log_softmax(consensus / p.temperature, dim=-1)
        q = logq.exp()
        logp_t = torch.log_softmax(z / p.temperature, dim=-1)
        # 0 * log 0 = 0 for absent classes (and no NaN in the gradient through the masked branch)
        logp_t = logp_t.masked_fill(~finite & (q == 0), 0.0)
        if p.soft_loss == "kl":
            soft = (q * (logq.masked_fill(q == 0, 0.0) - logp_t)).sum(-1)  # [H, N]
        else:
            soft = -(q * logp_t).sum(-1)  # [H, N]
        per = p.hard_coef * hard + p.soft_coef * soft

    zero = torch.zeros((), dtype=per.dtype, device=per.device)
    per = torch.where(valid, per, zero)
    num_valid = valid.sum()
    denom = num_valid.clamp(min=1).to(per.dtype)
    if p.reduction == "none":
        loss = per
    elif p.reduction == "sum":
        loss = per.sum()
    else:
        loss = per.sum() / denom
    if not return_stats:
        return loss
    with torch.no_grad():
        stats = CollabStats(
            hard=torch.where(valid, hard, zero).sum(1).float() / denom.float(),
            soft=torch.where(valid, soft, zero).sum(1).float() / denom.float(),
            correct=((z.argmax(-1) == y) & valid).sum(1).float(),
            num_valid=num_valid.float(),
        )
    return loss, stats


# ----------------------------------------------------------------------------------------------------
# Triton kernel: one program per sample row, all H heads as one [H_PAD, BLOCK_C] tile, so the
# consensus is formed in registers. Pass 1 accumulates online max / sums over column blocks; pass 2
# writes the gradient. When the row fits one block it is loaded once and its exponentials reused.
# ----------------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _load_block(z_row, stride_zc, cols, col_mask, head_mask):
        # [H_PAD, BLOCK_C] fp32 tile; columns >= C read as -inf (absent), padded heads as 0.
        ptrs = z_row + cols[None, :].to(tl.int64) * stride_zc
        z = tl.load(ptrs, mask=head_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
        return tl.where(col_mask[None, :], z, float("-inf"))

    @triton.jit
    def _load_cols(z_row, stride_zc, cols, C, head_mask, SAFE: tl.constexpr):
        # SAFE: as _load_block (the columns past C read as -inf); else a full block: no column mask at all
        if SAFE:
            return _load_block(z_row, stride_zc, cols, cols < C, head_mask)
        else:
            return tl.load(z_row + cols[None, :].to(tl.int64) * stride_zc, mask=head_mask[:, None],
                           other=0.0).to(tl.float32)

    @triton.jit
    def _exp2(x, FAST: tl.constexpr):
        # 2^x. FAST (NVIDIA): one MUFU.EX2 with flush to zero; tl.exp/tl.exp2 wrap each in a denormal fix-up
        # (a compare and two predicated multiplies). A result below 2^-126 becomes 0, which no softmax sum
        # (at least 1) or gradient can tell apart. Elsewhere (interpreter, other backends): tl.exp2.
        if FAST:
            return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                             is_pure=True, pack=1)
        else:
            return tl.exp2(x)

    @triton.jit
    def _swap_heads(x):
        # x [2, BLOCK_C] -> the other head's row. Both heads of a column live in one thread (the tiles'
        # layouts put warps along the columns), so the selects fold away: no instruction.
        h = tl.arange(0, 2)[:, None]
        x0 = tl.sum(tl.where(h == 0, x, -0.0), axis=0)  # x + (-0.0) == x exactly, -inf and NaN included
        x1 = tl.sum(tl.where(h == 1, x, -0.0), axis=0)
        return tl.where(h == 0, x1[None, :], x0[None, :])

    @triton.jit
    def _swap_heads3(x):
        # x [2, G, VEC] -> the other head's (as _swap_heads)
        h = tl.arange(0, 2)[:, None, None]
        x0 = tl.sum(tl.where(h == 0, x, -0.0), axis=0)
        x1 = tl.sum(tl.where(h == 1, x, -0.0), axis=0)
        return tl.where(h == 0, x1[None, :, :], x0[None, :, :])

    @triton.jit
    def _swap_head_stats(x):
        # x [2] -> the other head's value
        h = tl.arange(0, 2)
        x0 = tl.sum(tl.where(h == 0, x, -0.0), axis=0)
        x1 = tl.sum(tl.where(h == 1, x, -0.0), axis=0)
        return tl.where(h == 0, x1, x0)

    @triton.jit
    def _consensus_log2(z, total, head_mask, ck, H: tl.constexpr, SAFE: tl.constexpr):
        # u_h log2(e) = (sum of the other heads' z) log2(e) / (T (H - 1)); ck = log2(e) / (T (H - 1)).
        # Not SAFE: the caller found no -inf in the block, and total [BLOCK_C] is the plain sum over heads
        # (padded heads load as 0): one FFMA per element. SAFE: sums of the finite logits only, and -inf
        # where another head masks the class.
        if H == 2:  # the other head's z, -inf included: exact, no arithmetic
            u2 = _swap_heads(z) * ck
        elif SAFE:
            finite = (z > float("-inf")) & head_mask[:, None]
            absent = (z == float("-inf")) & head_mask[:, None]
            zf = tl.where(finite, z, 0.0)
            n_absent = tl.sum(absent.to(tl.int32), axis=0)
            u2 = tl.sum(zf, axis=0)[None, :] * ck - zf * ck
            u2 = tl.where((n_absent[None, :] - absent.to(tl.int32)) > 0, float("-inf"), u2)
        else:
            u2 = total[None, :] * ck - z * ck
        return u2

    @triton.jit
    def _pass1_block(z, head_mask, k, inv_t, m1, s1, s_t, m_c, s_c, t_c, v_c, H: tl.constexpr,
                     T_IS_TWO: tl.constexpr, KL: tl.constexpr, FAST: tl.constexpr):
        # Online update of the row statistics with one [H_PAD, BLOCK_C] block that may hold -inf (absent
        # classes, columns past C), the SAFE way (k = log2(e) / T; m_c, the consensus maximum, in log2 units).
        # Also returns the block's exponentials (relative to the updated maxima) for reuse when the row is one
        # block. Full blocks of finite logits take _pass1_blocks_per_thread instead.
        m_new = tl.maximum(m1, tl.max(z, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all absent so far: avoid inf - inf
        mk = m_safe * k
        e_t = _exp2(z * k - mk[:, None], FAST)  # exp((z - m) / T): the scale folded into one FFMA
        if T_IS_TWO:
            e_1 = e_t * e_t  # exp(z - m) from exp((z - m) / 2): one exponential fewer per element
        else:
            e_1 = _exp2(z * 1.4426950408889634 - (m_safe * 1.4426950408889634)[:, None], FAST)
        s1 = s1 * _exp2((m1 - m_safe) * 1.4426950408889634, FAST) + tl.sum(e_1, axis=1)
        s_t = s_t * _exp2(m1 * k - mk, FAST) + tl.sum(e_t, axis=1)
        e_u = e_t  # unused when H == 1
        if H == 2:
            # Head h's consensus is head 1-h's z / T: its maximum, exponentials and sum are the other head's
            # (m_c in log2 units, the offsets bit for bit those of e_t): no second exponential.
            mc_new = _swap_head_stats(m_new) * k
            mc_safe = _swap_head_stats(mk)
            e_u = _swap_heads(e_t)
            u2 = e_u  # (KL) computed below
            if KL:
                u2 = _swap_heads(z) * k
            rescale = _exp2(m_c - mc_safe, FAST)
        elif H > 1:
            u2 = _consensus_log2(z, z, head_mask, k / (H - 1), H, True)
            mc_new = tl.maximum(m_c, tl.max(u2, axis=1))
            mc_safe = tl.where(mc_new == float("-inf"), 0.0, mc_new)
            e_u = _exp2(u2 - mc_safe[:, None], FAST)
            rescale = _exp2(m_c - mc_safe, FAST)
        if H > 1:
            ez = tl.where(e_u > 0, e_u * z, 0.0)  # 0 * (-inf) at absent classes: their terms are 0
            if H == 2:
                s_c = _swap_head_stats(s_t)
            else:
                s_c = s_c * rescale + tl.sum(e_u, axis=1)
            t_c = t_c * rescale + tl.sum(ez, axis=1) * inv_t
            if KL:
                eu = tl.where(e_u > 0, e_u * u2, 0.0)
                v_c = v_c * rescale + tl.sum(eu, axis=1) * 0.6931471805599453
            m_c = mc_new
        return m_new, s1, s_t, m_c, s_c, t_c, v_c, e_1, e_t, e_u

    @triton.jit
    def _grad_block(z, p_1, p_t, q, u, cols0, y_rel, t, t_sum, r, rh1, rh, rs, qa, qu, n_fin, inv_t, soft_coef,
                    eps, H: tl.constexpr, DETACH: tl.constexpr, SMOOTH: tl.constexpr, KL: tl.constexpr,
                    PROBS: tl.constexpr):
        # dL/dz for one block, every head, with the upstream weights r [H_PAD] folded into the row factors:
        # rh1 on p_1 (softmax(z) up to a row factor), rh = r * hard factor, rs = r * soft factor / T. PROBS:
        # t [BLOCK_C] is the block of the target distribution (summing to t_sum over the row), else the
        # label is column y_rel of the block (int32: one compare a column).
        if PROBS:
            grad = (p_1 * rh1[:, None]) * ((1.0 - eps) * t_sum + eps) - (rh * (1.0 - eps))[:, None] * t[None, :]
        else:
            grad = p_1 * rh1[:, None] - tl.where(cols0[None, :] == y_rel, (rh * (1.0 - eps))[:, None], 0.0)
        if SMOOTH:
            grad -= tl.where(z > float("-inf"), (rh * eps / n_fin)[:, None], 0.0)
        if H > 1:
            grad += rs[:, None] * (p_t - q)
            if not DETACH:
                if KL:  # b = a - u: the consensus entropy's gradient
                    g_q = tl.where(q > 0, q * ((z * inv_t - u) - (qa - qu)[:, None]), 0.0) * (-inv_t / (H - 1))
                else:  # b = a
                    g_q = tl.where(q > 0, q * (z * inv_t - qa[:, None]), 0.0) * (-inv_t / (H - 1))
                g_q = r[:, None] * g_q  # padded heads have r = 0
                grad += soft_coef * (tl.sum(g_q, axis=0)[None, :] - g_q)
        return grad

    @triton.jit
    def _pass1_blocks_per_thread(z_row, stride_zc, t_row, stride_yc, head_mask, cols0, start: tl.constexpr,
                                 stop: tl.constexpr, k, inv_t,
                                 m1, s1, s_t, m_c, s_c, t_c, v_c, sum_fin, n_fin, arg, zt, t_sum, t_max, t_arg,
                                 BLOCK_C: tl.constexpr, H: tl.constexpr, H_PAD: tl.constexpr, VEC: tl.constexpr,
                                 T_IS_TWO: tl.constexpr, KL: tl.constexpr, STATS: tl.constexpr,
                                 SMOOTH: tl.constexpr, PROBS: tl.constexpr, NUM_STAGES: tl.constexpr,
                                 FAST: tl.constexpr):
        # Pass 1 over full blocks [start, stop), taken as finite: no column mask, no absent-class arithmetic
        # (a -inf makes the consensus sums NaN or -inf, and the caller runs the row again SAFE, _pass1_blocks),
        # from the row's initial statistics, with online statistics per thread: each group of columns one
        # thread holds keeps its own maxima and sums [H_PAD, G], so a block costs no reduction across
        # threads (no shuffles, shared memory or barriers); the groups are merged into the row's [H_PAD] once,
        # after the loop (the statistics' argmax too: a first column per group). Only a probability target
        # reduces per block.
        # A group: VEC > 1, the VEC adjacent columns of a 16-byte load; VEC = 1 (rows not 16-byte aligned,
        # e.g. C = 50257), the columns LANES apart that one thread loads one at a time (a looped row runs 4
        # warps: 128 lanes). The grouping only decides how the sums are split, never their value.
        LANES: tl.constexpr = 128 if BLOCK_C >= 128 else BLOCK_C
        if VEC > 1:
            G: tl.constexpr = BLOCK_C // VEC
            STEP: tl.constexpr = 1  # from one column of a group to the next
            group_col = (tl.arange(0, G) * VEC)[None, :]  # [1, G]: the group's first column in a block
        else:
            G: tl.constexpr = LANES
            STEP: tl.constexpr = LANES
            group_col = tl.arange(0, G)[None, :]
        gm1 = tl.full([H_PAD, G], float("-inf"), tl.float32)  # max z of the group
        gs1 = tl.zeros([H_PAD, G], tl.float32)  # sum exp(z - gm1)
        gst = tl.zeros([H_PAD, G], tl.float32)  # sum exp((z - gm1) / T)
        gmc = tl.full([H_PAD, G], float("-inf"), tl.float32)  # H >= 3: max u (log2 units)
        gsc = tl.zeros([H_PAD, G], tl.float32)  # H >= 3: sum 2^(u - gmc)
        gtc = tl.zeros([H_PAD, G], tl.float32)  # sum of the consensus exponentials times z
        gvc = tl.zeros([H_PAD, G], tl.float32)  # KL: sum of the consensus exponentials times u
        gsf = tl.zeros([H_PAD, G], tl.float32)  # SMOOTH: sum z
        garg = tl.zeros([H_PAD, G], tl.int32)  # STATS: the group's first column holding its maximum
        for b in tl.range(start, stop, num_stages=NUM_STAGES):
            cols = b * BLOCK_C + cols0
            z = _load_cols(z_row, stride_zc, cols, 0, head_mask, False)
            if PROBS:
                tb = tl.load(t_row + cols.to(tl.int64) * stride_yc).to(tl.float32)
                zt += tl.sum(tl.where(tb[None, :] != 0.0, tb[None, :] * z, 0.0), axis=1)
                t_sum += tl.sum(tb, axis=0)
                if STATS:
                    blk_t = tl.max(tb, axis=0)
                    t_arg = tl.where(blk_t > t_max, tl.argmax(tb, axis=0).to(tl.int64) + b * BLOCK_C, t_arg)
                    t_max = tl.maximum(t_max, blk_t)
            if VEC > 1:
                z3 = tl.reshape(z, [H_PAD, G, VEC])  # [H_PAD, G, columns of a group]
            else:
                z3 = tl.permute(tl.reshape(z, [H_PAD, BLOCK_C // LANES, LANES]), (0, 2, 1))
            blk_max = tl.max(z3, axis=2)
            if STATS:  # strict: an earlier block's column wins a tie
                garg = tl.where(blk_max > gm1, b * BLOCK_C + group_col + STEP * tl.argmax(z3, axis=2), garg)
            gm_new = tl.maximum(gm1, blk_max)
            gmk = gm_new * k
            a_t = _exp2(gm1 * k - gmk, FAST)  # rescale of the group's sums to its new maximum
            e_t = _exp2(z3 * k - gmk[:, :, None], FAST)
            if T_IS_TWO:
                gs1 = gs1 * (a_t * a_t) + tl.sum(e_t * e_t, axis=2)
            else:
                gs1 = gs1 * _exp2((gm1 - gm_new) * 1.4426950408889634, FAST) + tl.sum(
                    _exp2(z3 * 1.4426950408889634 - (gm_new * 1.4426950408889634)[:, :, None], FAST), axis=2)
            gst = gst * a_t + tl.sum(e_t, axis=2)
            if H == 2:  # the consensus is the other head's: its exponentials and rescale are swapped e_t, a_t
                e_u = _swap_heads3(e_t)
                a_u = _swap_heads(a_t)
                gtc = gtc * a_u + tl.sum(e_u * z3, axis=2)
                if KL:
                    gvc = gvc * a_u + tl.sum(e_u * _swap_heads3(z3), axis=2)
            elif H > 1:
                ck = k / (H - 1)
                u2 = tl.sum(z3, axis=0)[None, :, :] * ck - z3 * ck
                gmc_new = tl.maximum(gmc, tl.max(u2, axis=2))
                a_u = _exp2(gmc - gmc_new, FAST)
                e_u = _exp2(u2 - gmc_new[:, :, None], FAST)
                gsc = gsc * a_u + tl.sum(e_u, axis=2)
                gtc = gtc * a_u + tl.sum(e_u * z3, axis=2)
                if KL:
                    gvc = gvc * a_u + tl.sum(e_u * u2, axis=2)
                gmc = gmc_new
            if SMOOTH:
                gsf += tl.sum(z3, axis=2)
            gm1 = gm_new
        # merge the groups: each group's sums rescaled to the row's maxima
        m_row = tl.max(gm1, axis=1)
        if STATS:  # the first column holding the row's maximum
            arg = tl.min(tl.where(gm1 == m_row[:, None], garg, 2147483647), axis=1).to(tl.int64)
        w_t = _exp2(gm1 * k - (m_row * k)[:, None], FAST)
        s_t = tl.sum(gst * w_t, axis=1)
        if T_IS_TWO:
            s1 = tl.sum(gs1 * (w_t * w_t), axis=1)
        else:
            s1 = tl.sum(gs1 * _exp2((gm1 - m_row[:, None]) * 1.4426950408889634, FAST), axis=1)
        if H == 2:  # m_c, s_c: the other head's (in log2 units, as _pass1_block keeps them)
            w_u = _swap_heads(w_t)
            m_c = _swap_head_stats(m_row) * k
            s_c = _swap_head_stats(s_t)
            t_c = tl.sum(gtc * w_u, axis=1) * inv_t
            if KL:
                v_c = tl.sum(gvc * w_u, axis=1) * inv_t
        elif H > 1:
            m_c = tl.max(gmc, axis=1)
            w_u = _exp2(gmc - m_c[:, None], FAST)
            s_c = tl.sum(gsc * w_u, axis=1)
            t_c = tl.sum(gtc * w_u, axis=1) * inv_t
            if KL:
                v_c = tl.sum(gvc * w_u, axis=1) * 0.6931471805599453
        if SMOOTH:
            sum_fin = tl.sum(gsf, axis=1)
            n_fin = n_fin + (stop - start) * BLOCK_C
        return m_row, s1, s_t, m_c, s_c, t_c, v_c, sum_fin, n_fin, arg, zt, t_sum, t_max, t_arg

    @triton.jit
    def _pass1_blocks(z_row, stride_zc, t_row, stride_yc, head_mask, cols0, start: tl.constexpr, stop: tl.constexpr,
                      C, k, inv_t,
                      m1, s1, s_t, m_c, s_c, t_c, v_c, sum_fin, n_fin, arg, zt, t_sum, t_max, t_arg,
                      BLOCK_C: tl.constexpr, H: tl.constexpr, T_IS_TWO: tl.constexpr, KL: tl.constexpr,
                      STATS: tl.constexpr, SMOOTH: tl.constexpr, PROBS: tl.constexpr, NUM_STAGES: tl.constexpr,
                      FAST: tl.constexpr):
        # Pass 1 over the column blocks [start, stop) of a long row, the SAFE way: a block may hold -inf
        # (absent classes, the columns past C). Rows with -inf in a full block and the last, partial block
        # run here, in blocks of SAFE_BLOCK columns.
        for b in tl.range(start, stop, num_stages=NUM_STAGES):
            cols = b * BLOCK_C + cols0
            z = _load_cols(z_row, stride_zc, cols, C, head_mask, True)
            if STATS:
                blk_arg = tl.argmax(z, axis=1).to(tl.int64) + b * BLOCK_C
                arg = tl.where(tl.max(z, axis=1) > m1, blk_arg, arg)  # strict: first index wins
            m1, s1, s_t, m_c, s_c, t_c, v_c, _e1, _et, _eu = _pass1_block(
                z, head_mask, k, inv_t, m1, s1, s_t, m_c, s_c, t_c, v_c, H, T_IS_TWO, KL, FAST)
            if SMOOTH:
                finite = z > float("-inf")
                sum_fin += tl.sum(tl.where(finite, z, 0.0), axis=1)
                n_fin += tl.sum(finite.to(tl.float32), axis=1)
            if PROBS:
                tb = tl.load(t_row + cols.to(tl.int64) * stride_yc, mask=cols < C, other=0.0).to(tl.float32)
                zt += tl.sum(tl.where(tb[None, :] != 0.0, tb[None, :] * z, 0.0), axis=1)
                t_sum += tl.sum(tb, axis=0)
                if STATS:
                    blk_t = tl.max(tb, axis=0)
                    t_arg = tl.where(blk_t > t_max, tl.argmax(tb, axis=0).to(tl.int64) + b * BLOCK_C, t_arg)
                    t_max = tl.maximum(t_max, blk_t)
        return m1, s1, s_t, m_c, s_c, t_c, v_c, sum_fin, n_fin, arg, zt, t_sum, t_max, t_arg

    @triton.jit
    def _grad_blocks(z_row, stride_zc, g_row, stride_gc, t_row, stride_yc, head_mask, cols0, start: tl.constexpr,
                     stop: tl.constexpr, C, k,
                     lt, l1, lq, y_safe, t_sum, r, rh1, rh, rs, qa, qu, n_fin, inv_t, soft_coef, eps,
                     BLOCK_C: tl.constexpr, H: tl.constexpr, T_IS_TWO: tl.constexpr, DETACH: tl.constexpr,
                     SMOOTH: tl.constexpr, KL: tl.constexpr, PROBS: tl.constexpr, NUM_STAGES: tl.constexpr,
                     FAST: tl.constexpr, SAFE: tl.constexpr):
        # Pass 2 over the column blocks [start, stop) of a long row: normalised exponentials straight from
        # exp2, the row's log-sums (log2 units: lt, l1, lq) folded into the offsets. SAFE as in _pass1_blocks
        # (the row's pass 1 says which).
        for b in tl.range(start, stop, num_stages=NUM_STAGES):
            cols = b * BLOCK_C + cols0
            z = _load_cols(z_row, stride_zc, cols, C, head_mask, SAFE)
            p_t = _exp2(z * k - lt[:, None], FAST)
            if T_IS_TWO:
                p_1 = p_t * p_t  # softmax(z) up to the row factor in rh1
            else:
                p_1 = _exp2(z * 1.4426950408889634 - l1[:, None], FAST)
            q = p_t  # unused when H == 1
            u = p_t
            if H == 2:
                q = _swap_heads(p_t)  # lq is the other head's lt (see _pass1_block)
                if KL and not DETACH:
                    u = _swap_heads(z) * inv_t
            elif H > 1:
                u2 = _consensus_log2(z, tl.sum(z, axis=0), head_mask, k / (H - 1), H, SAFE)
                q = _exp2(u2 - lq[:, None], FAST)
                if KL and not DETACH:
                    u = u2 * 0.6931471805599453
            tb = tl.zeros([BLOCK_C], tl.float32)
            if PROBS:
                if SAFE:
                    tb = tl.load(t_row + cols.to(tl.int64) * stride_yc, mask=cols < C, other=0.0).to(tl.float32)
                else:
                    tb = tl.load(t_row + cols.to(tl.int64) * stride_yc).to(tl.float32)
            y_rel = (y_safe - b * BLOCK_C).to(tl.int32)
            grad = _grad_block(z, p_1, p_t, q, u, cols0, y_rel, tb, t_sum[:, None], r, rh1, rh, rs, qa, qu, n_fin,
                               inv_t, soft_coef, eps, H, DETACH, SMOOTH and SAFE, KL, PROBS)
            if SMOOTH and not SAFE:  # every class is present
                grad -= (rh * eps / n_fin)[:, None]
            grad = grad.to(g_row.dtype.element_ty)
            if SAFE:
                tl.store(g_row + cols[None, :].to(tl.int64) * stride_gc, grad,
                         mask=head_mask[:, None] & (cols < C)[None, :])
            else:
                tl.store(g_row + cols[None, :].to(tl.int64) * stride_gc, grad, mask=head_mask[:, None])

    @triton.jit
    def _collab_loss_kernel(
        z_ptr, stride_zh_v, stride_zn_v, stride_zc,  # logits [H, N, C], any strides (head/row strides / VEC)
        y_ptr, stride_y, stride_yc,  # target [N] integer labels, or (PROBS) [N, C] probabilities
        g_ptr, stride_gh_v, stride_gn_v, stride_gc,  # gradient out [H, N, C] (may alias the logits)
        loss_ptr,  # REDUCE: fp32 scalar, written by the last program; else fp32 [H, N] per-head per-sample loss
        stats_ptr,  # fp32 [5, H] out: mean hard, mean soft, correct count, [3, 0] = n_valid; [4, 0] n_valid for backward
        ws_ptr,  # fp32 [3H + 3] zeros (_workspace): sums of stats and loss, n_valid, ticket; left zeroed again
        r_ptr, stride_rh, stride_rn,  # upstream weights [H, N] (ROW_WEIGHTS: backward)
        rs_ptr,  # fp32 [K, H, N] row statistics (_row_stats_count): written by forward (ROW_STATS 1), read by backward (2)
        N, C_v, ignore_index,  # C / VEC
        inv_t, hard_coef, soft_coef, eps,  # the factors on the hard and the soft objective
        H: tl.constexpr, H_PAD: tl.constexpr, BLOCK_C: tl.constexpr, NUM_BLOCKS: tl.constexpr,
        REDUCE: tl.constexpr, MEAN: tl.constexpr, COMPUTE_LOSS: tl.constexpr,
        COMPUTE_GRAD: tl.constexpr, ROW_WEIGHTS: tl.constexpr, DETACH: tl.constexpr,
        STATS: tl.constexpr, SMOOTH: tl.constexpr, T_IS_TWO: tl.constexpr, KL: tl.constexpr,
        VEC: tl.constexpr,  # elements per 16 bytes when every row starts 16-byte aligned, else 1
        ROW_STATS: tl.constexpr,  # 0: none; 1: store pass 1's statistics; 2: load them instead of pass 1
        NUM_STAGES: tl.constexpr,  # > 1: the column loops prefetch the next blocks (cp.async into shared memory)
        PROBS: tl.constexpr,  # the target is a distribution over classes per sample (mixup, cutmix, smoothing)
        FAST_EXP: tl.constexpr,  # exponentials as one MUFU.EX2 each (NVIDIA; see _exp2)
        TAIL: tl.constexpr,  # SAFE blocks covering the last, partial block (0: C is a multiple of BLOCK_C)
        SAFE_BLOCK: tl.constexpr,  # columns per block in the SAFE loops (a divisor of BLOCK_C; see _safe_block)
    ):
        # The row strides and C arrive divided by VEC: multiplied back here, Triton knows that they are
        # multiples of VEC, so every row starts on a 16-byte boundary and masks are constant per VEC
        # columns: vector loads and stores (C = 1000 included) where the launcher found them legal.
        # tl.cast, not .to(): Triton's binder passes an integer argument equal to 1 as a Python constant.
        stride_zh = tl.cast(stride_zh_v, tl.int64) * VEC
        stride_zn = tl.cast(stride_zn_v, tl.int64) * VEC
        stride_gh = tl.cast(stride_gh_v, tl.int64) * VEC
        stride_gn = tl.cast(stride_gn_v, tl.int64) * VEC
        C = C_v * VEC
        n = tl.program_id(0).to(tl.int64)
        t_row = y_ptr + n * stride_y  # PROBS: the row's target distribution
        if PROBS:
            ok = n >= 0  # every sample counts
            bad = n < 0
            y_safe = n * 0
        else:
            y = tl.load(y_ptr + n * stride_y).to(tl.int64)
            valid = y != ignore_index
            in_range = (y >= 0) & (y < C)
            ok = valid & in_range
            bad = valid & (~in_range)  # out-of-range label: loss becomes NaN (device-side check, no sync)
            y_safe = tl.where(in_range, y, 0)

        heads = tl.arange(0, H_PAD)
        head_mask = heads < H
        z_row = z_ptr + n * stride_zn + heads[:, None].to(tl.int64) * stride_zh  # [H_PAD, 1]
        if PROBS:
            z_y = tl.zeros([H_PAD], tl.float32)  # unused
        else:
            z_y = tl.load(z_ptr + n * stride_zn + heads.to(tl.int64) * stride_zh + y_safe * stride_zc,
                          mask=head_mask, other=0.0).to(tl.float32)
        cols0 = tl.arange(0, BLOCK_C)
        k = inv_t * 1.4426950408889634  # log2(e) / T: exponentials as exp2 with the scale folded in
        SPLIT: tl.constexpr = BLOCK_C // SAFE_BLOCK  # SAFE blocks a block
        n_full: tl.constexpr = NUM_BLOCKS - (TAIL + SPLIT - 1) // SPLIT  # blocks of BLOCK_C columns, all before C
        safe_cols0 = tl.arange(0, SAFE_BLOCK)

        # ---- pass 1: row statistics per head ([H_PAD] vectors), online over column blocks ----
        # (backward of a long row loads them from forward instead: the row is read once per phase)
        m1 = tl.full([H_PAD], float("-inf"), tl.float32)  # max z
        s1 = tl.zeros([H_PAD], tl.float32)  # sum exp(z - m1)
        s_t = tl.zeros([H_PAD], tl.float32)  # sum exp((z - m1) / T)
        m_c = tl.full([H_PAD], float("-inf"), tl.float32)  # max u
        s_c = tl.zeros([H_PAD], tl.float32)  # sum exp(u - m_c)
        t_c = tl.zeros([H_PAD], tl.float32)  # sum exp(u - m_c) * a, so <q, a> = t_c / s_c
        v_c = tl.zeros([H_PAD], tl.float32)  # sum exp(u - m_c) * u, so <q, u> = v_c / s_c (KL)
        sum_fin = tl.zeros([H_PAD], tl.float32)  # sum of finite z (label smoothing)
        n_fin = tl.zeros([H_PAD], tl.float32)  # number of finite classes
        arg = tl.zeros([H_PAD], tl.int64)  # first argmax (stats)
        zt = tl.zeros([H_PAD], tl.float32)  # PROBS: <t, z_h> over the classes where t > 0
        if PROBS:
            t_sum = tl.zeros([H_PAD], tl.float32)  # sum of t (over the row; per head, all equal)
        else:
            t_sum = tl.zeros([H_PAD], tl.float32) + 1.0  # a label's distribution sums to 1
        t_max = (n * 0).to(tl.float32) - float("inf")  # PROBS: the target's top class (stats): value, first index
        t_arg = n * 0
        t = tl.zeros([BLOCK_C], tl.float32)  # PROBS: the target block of a one-block row, kept for pass 2
        safe_row = tl.zeros([H_PAD], tl.float32)  # > 0: the row holds -inf (absent classes); pass 2 is SAFE
        rs_row = rs_ptr + heads.to(tl.int64) * N + n  # [H_PAD]: statistic k of (head, row) at k * H * N
        if ROW_STATS == 2:
            # padded heads get finite values: their gradient is weighted by r = 0 and must not be NaN
            m1 = tl.load(rs_row, mask=head_mask, other=0.0)
            s1 = tl.load(rs_row + H * N, mask=head_mask, other=1.0)
            s_t = tl.load(rs_row + 2 * H * N, mask=head_mask, other=1.0)
            m_c = tl.load(rs_row + 3 * H * N, mask=head_mask, other=0.0)
            s_c = tl.load(rs_row + 4 * H * N, mask=head_mask, other=1.0)
            t_c = tl.load(rs_row + 5 * H * N, mask=head_mask, other=0.0)
            v_c = tl.load(rs_row + 6 * H * N, mask=head_mask, other=0.0)
            n_fin = tl.load(rs_row + 7 * H * N, mask=head_mask, other=1.0)
            safe_row = tl.load(rs_row + 8 * H * N, mask=head_mask, other=0.0)
            if PROBS:
                t_sum = tl.load(rs_row + 9 * H * N, mask=head_mask, other=1.0)
        elif NUM_BLOCKS == 1:
            # The whole row is one tile: read it once, keep its exponentials for pass 2.
            col_mask = cols0 < C
            z = _load_block(z_row, stride_zc, cols0, col_mask, head_mask)
            if STATS:
                arg = tl.argmax(z, axis=1).to(tl.int64)
            m1, s1, s_t, m_c, s_c, t_c, v_c, e_1, e_t, e_u = _pass1_block(
                z, head_mask, k, inv_t, m1, s1, s_t, m_c, s_c, t_c, v_c, H, T_IS_TWO, KL, FAST_EXP)
            if SMOOTH:
                finite = z > float("-inf")
                sum_fin = tl.sum(tl.where(finite, z, 0.0), axis=1)
                n_fin = tl.sum(finite.to(tl.float32), axis=1)
            if PROBS:
                t = tl.load(t_row + cols0.to(tl.int64) * stride_yc, mask=col_mask, other=0.0).to(tl.float32)
                zt = tl.sum(tl.where(t[None, :] != 0.0, t[None, :] * z, 0.0), axis=1)
                t_sum = tl.zeros([H_PAD], tl.float32) + tl.sum(t, axis=0)
                if STATS:
                    t_arg = tl.argmax(t, axis=0).to(tl.int64)
        else:
            # Full blocks first, taken as finite; again SAFE where the consensus sums say they were not (a
            # row with absent classes); then the last, partial block, SAFE.
            a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14 = _pass1_blocks_per_thread(
                z_row, stride_zc, t_row, stride_yc, head_mask, cols0, 0, n_full, k, inv_t,
                m1, s1, s_t, m_c, s_c, t_c, v_c, sum_fin, n_fin, arg, zt, t_sum, t_max, t_arg,
                BLOCK_C, H, H_PAD, VEC, T_IS_TWO, KL, STATS, SMOOTH, PROBS, NUM_STAGES, FAST_EXP)
            # A -inf (or NaN) logit in a full block makes these NaN or -inf: the row runs again SAFE.
            nonfinite = (a2 != a2) | (a3 != a3)
            if H > 1:
                nonfinite = nonfinite | (a5 != a5) | (a6 != a6) | (a6 == float("-inf")) | (a7 != a7)
            if SMOOTH:
                nonfinite = nonfinite | (a8 != a8) | (a8 == float("-inf"))
            if tl.sum(nonfinite.to(tl.int32), axis=0) > 0:
                safe_row += 1.0
                a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14 = _pass1_blocks(
                    z_row, stride_zc, t_row, stride_yc, head_mask, safe_cols0, 0, n_full * SPLIT, C, k, inv_t,
                    m1, s1, s_t, m_c, s_c, t_c, v_c, sum_fin, n_fin, arg, zt, t_sum, t_max, t_arg,
                    SAFE_BLOCK, H, T_IS_TWO, KL, STATS, SMOOTH, PROBS, NUM_STAGES, FAST_EXP)
            if TAIL:
                m1, s1, s_t, m_c, s_c, t_c, v_c, sum_fin, n_fin, arg, zt, t_sum, t_max, t_arg = _pass1_blocks(
                    z_row, stride_zc, t_row, stride_yc, head_mask, safe_cols0, n_full * SPLIT,
                    n_full * SPLIT + TAIL, C, k, inv_t, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14,
                    SAFE_BLOCK, H, T_IS_TWO, KL, STATS, SMOOTH, PROBS, NUM_STAGES, FAST_EXP)
            else:
                m1, s1, s_t, m_c, s_c, t_c, v_c, sum_fin, n_fin = a1, a2, a3, a4, a5, a6, a7, a8, a9
                arg, zt, t_sum, t_max, t_arg = a10, a11, a12, a13, a14

        m1_safe = tl.where(m1 == float("-inf"), 0.0, m1)
        lse_1 = m1_safe + tl.log(s1)
        if PROBS:
            hard = t_sum * lse_1 - zt  # -sum_i t_i log p_i
            if SMOOTH:
                hard = (1.0 - eps) * hard + eps * (lse_1 - sum_fin / n_fin)
        elif SMOOTH:
            hard = lse_1 - (1.0 - eps) * z_y - eps * sum_fin / n_fin
        else:
            hard = lse_1 - z_y
        mc_safe = tl.where(m_c == float("-inf"), 0.0, m_c)
        qa = t_c  # <q_h, a_h> below; unused when H == 1
        qu = v_c  # <q_h, u_h> below; used by KL only
        if H > 1:
            qa = t_c / s_c
            soft = m1_safe * inv_t + tl.log(s_t) - qa  # lse(a_h) - <q_h, a_h>
            if KL:
                qu = v_c / s_c
                soft -= mc_safe * 0.6931471805599453 + tl.log(s_c) - qu  # minus the consensus entropy lse(u_h) - <q_h, u_h>
            per = hard_coef * hard + soft_coef * soft
        else:
            soft = tl.zeros([H_PAD], tl.float32)
            per = hard

        # The workspace as int32 words: n_valid and the ticket after the sums of the stats and the loss; the
        # sums are read and zeroed as int32 exchanges (bit patterns; the interpreter exchanges no floats).
        ws_int = ws_ptr.to(tl.pointer_type(tl.int32))
        cnt_ptr = ws_int + 3 * H + 1
        if COMPUTE_LOSS:
            if REDUCE:
                row = tl.sum(tl.where(head_mask, per, 0.0), axis=0)
                tl.atomic_add(ws_ptr + 3 * H, tl.where(ok, row, tl.where(bad, float("nan"), 0.0)))
            else:
                per_out = tl.where(ok, per, tl.where(bad, float("nan"), 0.0))
                tl.store(loss_ptr + heads.to(tl.int64) * N + n, per_out, mask=head_mask)
            if STATS:
                # The mask as one comparison on the [H_PAD] block: an int1 block of the pointer's shape
                # (a scalar & block mixes ranks, which Triton 3.9's interpreter turns into int32).
                smask = tl.where(ok, heads, H_PAD) < H
                tl.atomic_add(ws_ptr + heads, hard, mask=smask)
                tl.atomic_add(ws_ptr + H + heads, soft, mask=smask)
                top = t_arg if PROBS else y_safe
                tl.atomic_add(ws_ptr + 2 * H + heads, (arg == top).to(tl.float32), mask=smask)
            if REDUCE or STATS:
                # The sums are finished by the last program to take a ticket: no count pass, no division
                # kernel. Triton's atomics are acq_rel, so every program's sums are visible to the one that
                # takes the last ticket; it reads them by exchanging them with 0, which leaves the workspace
                # zeroed for the next call (a workspace kept per device and stream: no zero fill per call).
                if (MEAN or STATS) and not PROBS:
                    tl.atomic_add(cnt_ptr, valid.to(tl.int32))
                if tl.atomic_add(cnt_ptr + 1, 1) == N - 1:
                    tl.atomic_xchg(cnt_ptr + 1, 0)
                    count = tl.atomic_xchg(cnt_ptr, 0).to(tl.float32)
                    if PROBS:
                        count = tl.cast(N, tl.float32)  # every sample counts
                    inv_valid = 1.0 / tl.maximum(count, 1.0)
                    if REDUCE:
                        total = tl.atomic_xchg(ws_int + 3 * H, 0).to(tl.float32, bitcast=True)
                        if MEAN:
                            total = total * inv_valid
                        tl.store(loss_ptr, total)
                    if STATS:
                        s_hard = tl.atomic_xchg(ws_int + heads, 0, mask=head_mask).to(tl.float32, bitcast=True)
                        s_soft = tl.atomic_xchg(ws_int + H + heads, 0, mask=head_mask).to(tl.float32, bitcast=True)
                        s_top = tl.atomic_xchg(ws_int + 2 * H + heads, 0, mask=head_mask).to(tl.float32, bitcast=True)
                        tl.store(stats_ptr + heads, s_hard * inv_valid, mask=head_mask)
                        tl.store(stats_ptr + H + heads, s_soft * inv_valid, mask=head_mask)
                        tl.store(stats_ptr + 2 * H + heads, s_top, mask=head_mask)
                        tl.store(stats_ptr + 3 * H + heads, tl.where(heads == 0, count, 0.0), mask=head_mask)
                    # n_valid for backward: a row the caller does not get (the stats are theirs to modify)
                    tl.store(stats_ptr + 4 * H, count)

        if ROW_STATS == 1:
            tl.store(rs_row, m1, mask=head_mask)
            tl.store(rs_row + H * N, s1, mask=head_mask)
            tl.store(rs_row + 2 * H * N, s_t, mask=head_mask)
            tl.store(rs_row + 3 * H * N, m_c, mask=head_mask)
            tl.store(rs_row + 4 * H * N, s_c, mask=head_mask)
            tl.store(rs_row + 5 * H * N, t_c, mask=head_mask)
            tl.store(rs_row + 6 * H * N, v_c, mask=head_mask)
            tl.store(rs_row + 7 * H * N, n_fin, mask=head_mask)
            tl.store(rs_row + 8 * H * N, safe_row, mask=head_mask)
            if PROBS:
                tl.store(rs_row + 9 * H * N, t_sum, mask=head_mask)

        # ---- pass 2: gradient ----
        if COMPUTE_GRAD:
            if ROW_WEIGHTS:
                r = tl.load(r_ptr + heads.to(tl.int64) * stride_rh + n * stride_rn,
                            mask=head_mask, other=0.0).to(tl.float32)
            else:
                r = tl.zeros([H_PAD], tl.float32) + 1.0
            if MEAN:  # the loss's grad_output over n_valid: every row of a distribution, else forward's [4, 0]
                if PROBS:
                    r = r / tl.maximum(tl.cast(N, tl.float32), 1.0)
                else:
                    r = r / tl.maximum(tl.load(stats_ptr + 4 * H), 1.0)
            r = tl.where(ok & head_mask, r, 0.0)
            if H > 1:
                rh = r * hard_coef
            else:
                rh = r  # one head: plain cross-entropy
            rs = r * (soft_coef * inv_t)
            g_row = g_ptr + n * stride_gn + heads[:, None].to(tl.int64) * stride_gh
            if NUM_BLOCKS == 1 and ROW_STATS != 2:
                u = e_u  # used only for KL through a live consensus
                if H > 1:
                    if KL and not DETACH:
                        u = _consensus_log2(z, z, head_mask, k / (H - 1), H, True) * 0.6931471805599453
                grad = _grad_block(z, e_1, e_t * (1.0 / s_t)[:, None], e_u * (1.0 / s_c)[:, None], u, cols0,
                                   y_safe.to(tl.int32), t, t_sum[:, None], r, rh / s1, rh, rs, qa, qu, n_fin, inv_t,
                                   soft_coef, eps, H, DETACH, SMOOTH, KL, PROBS)
                grad = tl.where(ok, grad, 0.0)
                tl.store(g_row + cols0[None, :].to(tl.int64) * stride_gc, grad.to(g_ptr.dtype.element_ty),
                         mask=head_mask[:, None] & col_mask[None, :])
            else:
                # With T = 2, softmax(z) = p_t^2 s_t^2 / s1: the row factor goes into rh1.
                lt = m1_safe * k + tl.log2(s_t)
                if T_IS_TWO:
                    rh1 = rh * (s_t * s_t / s1)
                else:
                    rh1 = rh
                l1 = m1_safe * 1.4426950408889634 + tl.log2(s1)
                lq = mc_safe + tl.log2(s_c)
                if ok:  # (a row-level branch: no per-element select of ignored rows)
                    if tl.max(safe_row, axis=0) > 0:  # pass 1 found -inf in a full block
                        _grad_blocks(z_row, stride_zc, g_row, stride_gc, t_row, stride_yc, head_mask, safe_cols0, 0,
                                     n_full * SPLIT, C, k, lt, l1, lq, y_safe, t_sum, r, rh1, rh, rs, qa, qu, n_fin,
                                     inv_t, soft_coef, eps, SAFE_BLOCK, H, T_IS_TWO, DETACH, SMOOTH, KL, PROBS,
                                     NUM_STAGES, FAST_EXP, True)
                    else:
                        _grad_blocks(z_row, stride_zc, g_row, stride_gc, t_row, stride_yc, head_mask, cols0, 0,
                                     n_full, C, k, lt, l1, lq, y_safe, t_sum, r, rh1, rh, rs, qa, qu, n_fin,
                                     inv_t, soft_coef, eps, BLOCK_C, H, T_IS_TWO, DETACH, SMOOTH, KL, PROBS,
                                     NUM_STAGES, FAST_EXP, False)
                    if TAIL:
                        _grad_blocks(z_row, stride_zc, g_row, stride_gc, t_row, stride_yc, head_mask, safe_cols0,
                                     n_full * SPLIT, n_full * SPLIT + TAIL, C, k, lt, l1, lq, y_safe, t_sum, r, rh1,
                                     rh, rs, qa, qu, n_fin, inv_t, soft_coef, eps, SAFE_BLOCK, H, T_IS_TWO, DETACH,
                                     SMOOTH, KL, PROBS, NUM_STAGES, FAST_EXP, True)
                else:  # an ignored sample: a zero gradient, whatever its logits hold
                    for b in tl.range(0, NUM_BLOCKS):
                        cols = b * BLOCK_C + cols0
                        tl.store(g_row + cols[None, :].to(tl.int64) * stride_gc,
                                 tl.zeros([H_PAD, BLOCK_C], g_ptr.dtype.element_ty),
                                 mask=head_mask[:, None] & (cols < C)[None, :])


# ----------------------------------------------------------------------------------------------------
# Launcher: checks, allocation, block sizes.
# ----------------------------------------------------------------------------------------------------

_MAX_TILE = 8192  # elements of the [H_PAD, BLOCK_C] register tile
# Rows longer than one block (LM vocabularies) loop over blocks of at most _LONG_ROW_BLOCK columns with 4
# warps. Measured on an H200 (benchmarks/results/bench_loss_sweep_nvidia-h200_2026-12-04.md: fwd+bwd kernel-only
# over tiles 4096-16384, 4/8/16 warps, prefetch on/off): 4 warps were fastest at both LM shapes, and the
# earlier rule (warps = tile / 512, i.e. 16) was 1.7x (H2 C128256: 5.74 -> 3.31 ms) and 4.1x (H8 C32000:
# 22.7 -> 5.49 ms) slower; blocks of 2048 (H2) and 1024 (H8) columns were the fastest there (before the
# per-thread statistics). Since: with 3-8 heads the registers bound the warps an SM keeps, so the block and a
# register cap are chosen from the sm_90 SASS (benchmarks/sass_loss.py: no spill, <= 128 registers, the
# fewest instructions a logit): 3-4 heads 1024 columns (2048: the backward spills), 5-8 heads 512 (at 1024
# the finite loop alone needs 168 registers: 2-3 CTAs an SM; at 512 it needs <= 128 for ~10% more
# instructions a logit). Unswept on a GPU.
_LONG_ROW_BLOCK = 2048
_LONG_ROW_BLOCKS = {4: 1024, 8: 512}  # by H_PAD; more heads: the largest tile (_MAX_TILE)
# ptxas's register limit for looped rows of 3-8 heads: 4 CTAs of 4 warps an SM. Kept where the kernel does
# not spill under it (launch.CachedLauncher checks each compile): the defaults never do on sm_90 under
# Triton 3.6-3.9; some settings with stats, a live consensus or a target distribution would, and run uncapped.
_REG_CAP = 128
# Software pipelining of the column loops (rows of at least this many blocks): Triton turns the loop's
# loads into cp.async copies of the next block into shared memory. Off (1) by default: on the H200 sweep it
# was slower in 16 of 18 configurations (by 1-12%; 2x in one). 2 compiles without stack or local memory
# under Triton 3.6-3.9; bench_loss.py's "ours-prefetch" provider keeps the A/B.
_LOOP_STAGES = 1
_SAFE_TILE = 1024  # elements of the SAFE loops' [H_PAD, SAFE_BLOCK] tile (see _safe_block)


def interpreter_active() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1 before import)."""
    if triton is None:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_collab_loss_kernel, InterpretedFunction)


@functools.cache  # fixed at import: the interpreter is chosen by TRITON_INTERPRET before it
def _fast_exp() -> bool:
    """Exponentials through PTX's ex2.approx.ftz (see _exp2): compiled for NVIDIA GPUs, not interpreted."""
    return torch.version.hip is None and not interpreter_active()


def _check_triton_usable(device: torch.device) -> None:
    if triton is None:
        raise RuntimeError(f"impl='triton' needs the triton package, which failed to import: {_TRITON_IMPORT_ERROR}")
    if device.type != "cuda" and not interpreter_active():
        raise RuntimeError(
            f"impl='triton' got {device.type} tensors: the Triton kernel runs on CUDA tensors, or on CPU "
            "tensors only under the Triton interpreter (set TRITON_INTERPRET=1 before importing collab_fast). "
            "Use impl='torch' or impl='auto' for the reference on CPU."
        )


def _vector_width(logits: torch.Tensor, grad: torch.Tensor) -> int:
    """Elements per 16-byte vector when the logits and the gradient both have unit class stride, 16-byte
    aligned storage, and head and row strides and C that are multiples of it; else 1 (scalar accesses)."""
    size = logits.element_size()
    vec = 16 // size
    if logits.shape[2] % vec:
        return 1
    for t in (logits,) if grad is logits else (logits, grad):
        s = t.stride()
        if s[2] != 1 or s[0] % vec or s[1] % vec or t.data_ptr() % 16 or t.element_size() != size:
            return 1
    return vec


def _pow2(n: int) -> int:
    """The smallest power of two >= n (triton.next_power_of_2 without its per-call host cost)."""
    return 1 << max(int(n) - 1, 0).bit_length()


def pick_block_c(num_heads: int, num_classes: int, block_c: int | None = None) -> tuple[int, int, int]:
    """Column block, number of blocks and warps for a row of `num_heads` x `num_classes`."""
    h_pad = _pow2(num_heads)
    if block_c is None:
        block_c = min(_pow2(num_classes), max(_MAX_TILE // h_pad, 16))
        if block_c < num_classes:  # a looped row: see _LONG_ROW_BLOCK
            block_c = min(block_c, _LONG_ROW_BLOCK if h_pad <= 2 else _LONG_ROW_BLOCKS.get(h_pad, block_c))
    num_blocks = -(-num_classes // block_c)
    num_warps = 4 if num_blocks > 1 else min(16, max(4, (h_pad * block_c) // 512))
    return block_c, num_blocks, num_warps


def _safe_block(num_heads: int, block_c: int) -> int:
    """Columns per block of the SAFE loops (rows with -inf logits, the last partial block). Their tile holds
    more live values per logit than the finite loop's (absent-class masks and counts, per-block maxima), and
    the kernel's registers are the most any of its loops needs: at the finite loop's block they set the
    count (H8 at 1024 columns: 245 registers, 168 without them). They run over narrower blocks instead."""
    return min(block_c, max(16, _SAFE_TILE // _pow2(num_heads)))


# Shared memory: a prefetching loop keeps (stages - 1) tiles of [H_PAD, BLOCK_C] in shared memory, and
# Triton's layout conversions and cross-warp reductions need up to one tile of scratch. The default block
# (a tile of at most _MAX_TILE elements: 32 KB in fp32) fits every GPU; a user's block_c may not (the
# 99 KB of sm_86/89/120, the 227 KB of sm_90): prefetch is then turned off, and a tile that does not fit
# even without it is refused before launch instead of failing there with OutOfResources.
_SMEM_MARGIN = 4096  # bytes for the kernel's small reduction buffers


def shared_memory_limit(device: torch.device) -> int | None:
    """Bytes of shared memory one program may use on `device` (opt-in maximum); None off CUDA."""
    if device.type != "cuda" or interpreter_active():
        return None
    return _smem_of(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _smem_of(index: int) -> int:
    props = torch.cuda.get_device_properties(index)
    return int(getattr(props, "shared_memory_per_block_optin", 0) or getattr(props, "shared_memory_per_block", 49152))


def loop_stages(num_heads: int, block_c: int, num_blocks: int, element_size: int, smem_limit: int | None,
                user_block: bool = False, depth: int | None = None) -> int:
    """Pipeline depth of the column loops for this tile on a device with `smem_limit` bytes per program:
    `depth` (default _LOOP_STAGES) where it fits and the row has that many blocks, else 1."""
    tile = _pow2(num_heads) * block_c * element_size
    if smem_limit is not None and tile + _SMEM_MARGIN > smem_limit:
        largest = max(16, _pow2((smem_limit - _SMEM_MARGIN) // (_pow2(num_heads) * element_size)) // 2)
        what = "block_c" if user_block else "the column block"
        raise ValueError(f"{what}={block_c} needs about {(tile + _SMEM_MARGIN) // 1024} KB of shared memory for "
                         f"{num_heads} heads of {element_size}-byte logits, over this GPU's {smem_limit // 1024} KB "
                         f"per block: use block_c <= {largest} (or leave block_c unset)")
    depth = _LOOP_STAGES if depth is None else depth
    stages = depth if num_blocks >= depth else 1
    if stages > 1 and smem_limit is not None and stages * tile + _SMEM_MARGIN > smem_limit:
        stages = 1  # the prefetch buffer does not fit next to the scratch: no prefetch
    return stages


_CONSTEXPRS = ("H", "H_PAD", "BLOCK_C", "NUM_BLOCKS", "REDUCE", "MEAN", "COMPUTE_LOSS", "COMPUTE_GRAD", "ROW_WEIGHTS",
               "DETACH", "STATS", "SMOOTH", "T_IS_TWO", "KL", "VEC", "ROW_STATS", "NUM_STAGES", "PROBS", "FAST_EXP",
               "TAIL", "SAFE_BLOCK")
_kernel_launcher = CachedLauncher(_collab_loss_kernel, _CONSTEXPRS) if triton is not None else None


@functools.lru_cache(maxsize=256)
def _plan(num_heads: int, num_classes: int, block_c: int | None, element_size: int, smem_limit: int | None):
    """(H_PAD, block, number of blocks, warps, loop stages, SAFE blocks of the tail, SAFE block, register
    cap or None) of a row: computed once per shape."""
    block, num_blocks, num_warps = pick_block_c(num_heads, num_classes, block_c)
    stages = loop_stages(num_heads, block, num_blocks, element_size, smem_limit, block_c is not None)
    safe = _safe_block(num_heads, block)
    tail = -(-(num_classes % block) // safe)
    h_pad = _pow2(num_heads)
    cap = _REG_CAP if num_blocks > 1 and h_pad in _LONG_ROW_BLOCKS and _fast_exp() else None
    return h_pad, block, num_blocks, num_warps, stages, tail, safe, cap


_WORKSPACES: dict = {}  # (device index, stream, H) -> the kernel's zeroed workspace on that stream


def _workspace(num_heads: int, device: torch.device) -> torch.Tensor:
    """fp32 [3H + 3] zeros for the kernel's sums (stats, loss), n_valid and ticket (int32 words). The kernel
    leaves it zeroed, so on CUDA one per device, stream and H is kept (calls on one stream run in order): no
    zero fill per call. Elsewhere (the interpreter), and while a CUDA graph is captured (the graph keeps its
    own, so that a replay on another stream shares nothing), a fresh one."""
    fresh = lambda: torch.zeros(3 * num_heads + 3, dtype=torch.float32, device=device)
    if device.type != "cuda":
        return fresh()
    current = torch.cuda.current_device()
    index = current if device.index is None else device.index
    with torch.cuda.device(index) if index != current else contextlib.nullcontext():
        if torch.cuda.is_current_stream_capturing():  # (the stream of the logits' device)
            return fresh()
    key = (index, torch._C._cuda_getCurrentRawStream(index), num_heads)
    ws = _WORKSPACES.get(key)
    if ws is None:
        ws = _WORKSPACES[key] = torch.zeros(3 * num_heads + 3, dtype=torch.float32, device=device)
    return ws


def _launch(
    logits: torch.Tensor,  # [H, N, C]
    target: torch.Tensor,  # [N] labels, or [N, C] probabilities (floating point)
    params: CollabLossParams,
    *,
    compute_loss: bool = True,
    compute_grad: bool = False,
    return_stats: bool = False,
    row_weights: torch.Tensor | None = None,  # [H, N] or [] upstream weights (backward)
    grad_out: torch.Tensor | None = None,  # where to write the gradient (default: fresh [H, N, C])
    save_row_stats: torch.Tensor | None = None,  # fp32 [K, H, N]: forward stores pass 1's statistics here
    row_stats: torch.Tensor | None = None,  # fp32 [K, H, N] from forward: backward skips pass 1
    counts: torch.Tensor | None = None,  # backward of "mean": forward's [5, H] stats buffer ([4, 0] = n_valid)
):
    """Runs the kernel once. Returns (loss, stats [4, H] or None, grad or None, counts or None): a forward
    of "mean" (or with stats) returns the [5, H] buffer holding n_valid, which backward takes as `counts`."""
    num_heads, n, c = logits.shape
    device = logits.device
    h_pad, block, num_blocks, num_warps, stages, tail, safe, cap = _plan(
        num_heads, c, params.block_c, logits.element_size(), shared_memory_limit(device))
    reduce = compute_loss and params.reduction != "none" and row_weights is None
    mean = params.reduction == "mean" and (reduce or counts is not None)
    if compute_grad and (reduce or return_stats):
        raise ValueError("internal: a launch that reduces the loss or counts stats computes no gradient")
    f32 = torch.float32
    finish = reduce or return_stats  # the last program finishes sums kept in the workspace
    ws = _workspace(num_heads, device) if finish and n else None
    if finish:
        stats = (torch.empty if n else torch.zeros)((5, num_heads), dtype=f32, device=device)
    else:
        stats = counts
    if reduce:
        loss = (torch.empty if n else torch.zeros)((), dtype=f32, device=device)
    elif compute_loss:
        loss = torch.empty((num_heads, n), dtype=f32, device=device)
    else:
        loss = stats if stats is not None else row_weights  # a pointer the kernel never uses
    if stats is None:
        stats = loss
    if ws is None:
        ws = loss
    probs = target.is_floating_point()
    if compute_grad:
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format) if grad_out is None else grad_out
    else:
        grad = logits  # never written (COMPUTE_GRAD is a constexpr False)
    r = row_weights if row_weights is not None else loss
    r_strides = (0, 0) if row_weights is None or row_weights.dim() == 0 else row_weights.stride()
    vec = _vector_width(logits, grad)
    mode = 1 if save_row_stats is not None else 2 if row_stats is not None else 0
    rs = save_row_stats if mode == 1 else row_stats if mode == 2 else loss
    if mode:
        k = _row_stats_count(target)
        if rs.shape != (k, num_heads, n) or rs.dtype != f32 or not rs.is_contiguous():
            raise ValueError(f"row statistics must be contiguous float32 [{k}, {num_heads}, {n}], got {rs.dtype} "
                             f"{tuple(rs.shape)}")
    if n > 0:
        # Triton launches on the current device: logits on another GPU (model parallel, device_map) need it set.
        index = device.index
        guard = (torch.cuda.device(device) if device.type == "cuda" and index is not None
                 and index != torch.cuda.current_device() else contextlib.nullcontext())
        with guard:
            _kernel_launcher(n, (
                logits, logits.stride(0) // vec, logits.stride(1) // vec, logits.stride(2),
                target, target.stride(0), target.stride(1) if probs else 0,
                grad, grad.stride(0) // vec, grad.stride(1) // vec, grad.stride(2),
                loss, stats, ws, r, r_strides[0], r_strides[1], rs,
                n, c // vec, params.ignore_index,
                1.0 / params.temperature, params.hard_coef, params.soft_coef, params.label_smoothing,
            ), (num_heads, h_pad, block, num_blocks, reduce, mean, compute_loss, compute_grad, row_weights is not None,
                params.detach_consensus, return_stats, params.label_smoothing > 0, params.temperature == 2.0,
                params.soft_loss == "kl", vec, mode, stages, probs, _fast_exp(), tail, safe), num_warps,
                index if device.type == "cuda" else None, cap)
    elif compute_grad and grad_out is None:
        grad.zero_()
    return loss, (stats[:4] if return_stats else None), (grad if compute_grad else None), (stats if finish else None)


def _num_valid(target: torch.Tensor, params: CollabLossParams) -> torch.Tensor:
    """[] the number of samples that count, on the device (no sync): labels other than ignore_index, or
    every row of a probability target."""
    if target.is_floating_point():
        return torch.full((), target.shape[0], dtype=torch.int64, device=target.device)
    return (target != params.ignore_index).sum()


def _row_stats_count(target: torch.Tensor) -> int:
    # m1, s1, s_t, m_c, s_c, t_c, v_c, n_fin, the row's absent-class flag; the target's sum for probabilities
    return 10 if target.is_floating_point() else 9


def _row_stats_buffer(logits: torch.Tensor, target: torch.Tensor, params: CollabLossParams) -> torch.Tensor | None:
    """fp32 [K, H, N] for forward to keep pass 1's statistics of rows longer than one block (backward then
    reads the row once instead of twice); None where a row is one block (read once anyway)."""
    num_heads, n, c = logits.shape
    if pick_block_c(num_heads, c, params.block_c)[1] == 1:
        return None
    return torch.empty((_row_stats_count(target), num_heads, n), dtype=torch.float32, device=logits.device)


# ----------------------------------------------------------------------------------------------------
# torch.library custom ops: what torch.compile sees (opaque, with fake implementations). A custom op's
# schema takes no dataclass, so the params travel as their fields and are rebuilt (already validated
# values: no new checks fail). Eager calls go straight to _launch, avoiding the dispatcher's overhead.
# ----------------------------------------------------------------------------------------------------


def _params_args(p: CollabLossParams) -> tuple:
    # The resolved coefficients travel (beta/soft_weight or weights alike): (hard_coef, soft_coef).
    return (p.temperature, p.hard_coef, p.soft_coef, p.detach_consensus, p.ignore_index, p.label_smoothing,
            p.reduction, p.block_c or 0, p.soft_loss)


def _params_from(temperature, hard_coef, soft_coef, detach_consensus, ignore_index, label_smoothing, reduction,
                 block_c, soft_loss) -> CollabLossParams:
    return CollabLossParams(temperature, None, None, detach_consensus, ignore_index, label_smoothing,
                            reduction, "triton", block_c or None, soft_loss, (hard_coef, soft_coef))


@torch.library.custom_op("collab_fast::collab_loss_forward", mutates_args=())
def _collab_loss_forward_op(
    logits: torch.Tensor, target: torch.Tensor, temperature: float, hard_coef: float, soft_coef: float,
    detach_consensus: bool, ignore_index: int, label_smoothing: float, reduction: str, block_c: int,
    soft_loss: str, keep_row_stats: bool, return_stats: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    params = _params_from(temperature, hard_coef, soft_coef, detach_consensus, ignore_index, label_smoothing,
                          reduction, block_c, soft_loss)
    rs = _row_stats_buffer(logits, target, params) if keep_row_stats else None
    loss, stats, _, _ = _launch(logits, target, params, return_stats=return_stats, save_row_stats=rs)
    empty = logits.new_empty((0,), dtype=torch.float32)
    return loss, (stats if stats is not None else empty), (rs if rs is not None else empty.clone())


@_collab_loss_forward_op.register_fake
def _(logits, target, temperature, hard_coef, soft_coef, detach_consensus, ignore_index, label_smoothing,
      reduction, block_c, soft_loss, keep_row_stats, return_stats):
    h, n, c = logits.shape
    loss = logits.new_empty((h, n) if reduction == "none" else (), dtype=torch.float32)
    stats = logits.new_empty((4, h) if return_stats else (0,), dtype=torch.float32)
    # The block choice needs concrete H and C (the kernel is specialised on them anyway): int() guards on
    # them; symbolic power-of-two arithmetic took minutes under dynamic shapes. N stays dynamic.
    long_rows = pick_block_c(int(h), int(c), block_c or None)[1] > 1
    k = _row_stats_count(target)
    rs = logits.new_empty((k, h, n) if keep_row_stats and long_rows else (0,), dtype=torch.float32)
    return loss, stats, rs


@torch.library.custom_op("collab_fast::collab_loss_backward_rows", mutates_args=())
def _collab_loss_backward_rows_op(
    logits: torch.Tensor, target: torch.Tensor, row_weights: torch.Tensor, row_stats: torch.Tensor,
    temperature: float, hard_coef: float, soft_coef: float, detach_consensus: bool, ignore_index: int,
    label_smoothing: float, reduction: str, block_c: int, soft_loss: str,
) -> torch.Tensor:
    params = _params_from(temperature, hard_coef, soft_coef, detach_consensus, ignore_index, label_smoothing,
                          reduction, block_c, soft_loss)
    _, _, grad, _ = _launch(logits, target, params, compute_loss=False, compute_grad=True, row_weights=row_weights,
                         row_stats=row_stats if row_stats.numel() else None)
    return grad


@_collab_loss_backward_rows_op.register_fake
def _(logits, target, row_weights, row_stats, temperature, hard_coef, soft_coef, detach_consensus, ignore_index,
      label_smoothing, reduction, block_c, soft_loss):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


# ----------------------------------------------------------------------------------------------------
# Autograd: forward reads the logits once for the loss (and statistics); backward launches the kernel
# again with the upstream weights r [H, N] read on the device (grad_output / n_valid for "mean", a
# stride-0 view of the scalar), so the gradient is written once, already scaled: no stored [H, N, C]
# gradient between forward and backward, no extra multiply pass, no host sync. Rows longer than one
# block: forward keeps pass 1's statistics (fp32 [9, H, N], 36 bytes a row and head), so backward reads
# each row once too.
# ----------------------------------------------------------------------------------------------------


def _upstream_weights(grad_loss: torch.Tensor, target: torch.Tensor, params: CollabLossParams, shape) -> torch.Tensor:
    """r [H, N] of the gradient formula from the loss's grad_output, without a host sync."""
    if params.reduction == "none":
        return grad_loss
    r = grad_loss.float()
    if params.reduction == "mean":
        r = r / _num_valid(target, params).clamp_min(1)
    return r.expand(shape)  # strides (0, 0): every row reads the same scalar


def _forward_op_setup_context(ctx, inputs, output):
    logits, target, *params_args = inputs
    ctx.params_args = params_args[:9]  # temperature ... soft_loss; keep_row_stats, return_stats left out
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.save_for_backward(logits, target, output[2])


def _forward_op_backward(ctx, grad_loss, _grad_stats, _grad_row_stats):
    # The op's own gradient (what opcheck and AOTAutograd differentiate): the kernel's gradient pass. The
    # gradient op itself is not differentiable (no double backward through the Triton kernel).
    logits, target, rs = ctx.saved_tensors
    params = _params_from(*ctx.params_args)
    r = _upstream_weights(grad_loss, target, params, logits.shape[:2])
    grad = torch.ops.collab_fast.collab_loss_backward_rows(logits, target, r, rs, *ctx.params_args)
    return (grad,) + (None,) * 12


torch.library.register_autograd("collab_fast::collab_loss_forward", _forward_op_backward,
                                setup_context=_forward_op_setup_context)


class _FusedCollabLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, params: CollabLossParams, return_stats, inplace):
        compiling = torch.compiler.is_compiling()
        needs_grad = ctx.needs_input_grad[0]
        counts = None
        if compiling:
            if inplace:
                raise NotImplementedError("fused_collab_loss(inplace=True) is not supported under torch.compile")
            loss, stats, rs = torch.ops.collab_fast.collab_loss_forward(
                logits, target, *_params_args(params), needs_grad, return_stats)
        else:
            rs = _row_stats_buffer(logits, target, params) if needs_grad else None
            loss, stats, _, counts = _launch(logits, target, params, return_stats=return_stats, save_row_stats=rs)
        # forward's [5, H] stats buffer holds n_valid in a row of its own ([4, 0]): backward's kernel divides
        # grad_output by it (no ATen op). Kept on ctx, not saved: the stats returned are a view of its first four
        # rows, which a caller may modify in place without touching the count.
        ctx.params, ctx.compiling, ctx.inplace, ctx.counts = params, compiling, inplace, counts
        if needs_grad:
            ctx.save_for_backward(logits, target, rs)
        if stats is None:
            stats = loss.new_empty(0)
        ctx.mark_non_differentiable(stats)
        ctx.set_materialize_grads(False)  # no zeros made for the stats' (absent) gradient
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        if grad_loss is None:
            return None, None, None, None, None
        if torch.is_grad_enabled():  # create_graph=True: a gradient of this gradient was asked for
            raise RuntimeError(
                "fused_collab_loss: double backward (create_graph=True, e.g. a gradient penalty) is not "
                "supported by the Triton kernel, whose gradient is not differentiable; use impl='torch' for it")
        params = ctx.params
        logits, target, rs = ctx.saved_tensors
        if ctx.compiling:
            r = _upstream_weights(grad_loss, target, params, logits.shape[:2])
            grad = torch.ops.collab_fast.collab_loss_backward_rows(logits, target, r, rs, *_params_args(params))
        else:
            _, _, grad, _ = _launch(logits, target, params, compute_loss=False, compute_grad=True,
                                    row_weights=grad_loss, counts=ctx.counts, grad_out=logits if ctx.inplace else None,
                                    row_stats=rs)
            if ctx.inplace:
                # The logits now hold the gradient: any other node that saved them must refuse to run.
                torch.autograd.graph.increment_version(logits)
        return grad, None, None, None, None


# ----------------------------------------------------------------------------------------------------
# Functional API
# ----------------------------------------------------------------------------------------------------


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


def _labels_checked_on_host(target: torch.Tensor) -> bool:
    # CPU tensors are checked eagerly (cheap, no device sync); CUDA tensors only when asked, since the
    # check reads a value back to the host. Unchecked labels (CUDA, or anything under torch.compile,
    # where the check would break the graph) are checked in the kernel: an out-of-range label makes
    # the loss NaN.
    if torch.compiler.is_compiling():
        return False
    return target.device.type == "cpu" or os.environ.get("COLLAB_FAST_CHECK_LABELS", "0") == "1"


def _check_inputs(logits, target: torch.Tensor, params: CollabLossParams) -> tuple[torch.Tensor, torch.Tensor]:
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
    if _labels_checked_on_host(target) and n > 0:
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
    if _labels_checked_on_host(target) and n > 0:
        bad = ~torch.isfinite(target) | (target < 0)
        if bool(bad.any()):
            i, j = (int(v) for v in bad.nonzero()[0])
            raise ValueError(f"target[{i}, {j}] = {float(target[i, j])}: probabilities must be finite and >= 0")
    return target


def collab_loss(logits, target: torch.Tensor, params: CollabLossParams, *, return_stats: bool = False,
                inplace: bool = False):
    """fused_collab_loss with its settings already validated in `params` (what CollabLoss calls)."""
    logits, target = _check_inputs(logits, target, params)
    if params.impl == "auto":
        use_kernel = logits.device.type == "cuda" and logits.dtype in _KERNEL_DTYPES
    else:
        use_kernel = params.impl == "triton"
    if use_kernel:
        _check_triton_usable(logits.device)
        if logits.dtype not in _KERNEL_DTYPES:
            raise TypeError(f"impl='triton' takes float32, bfloat16 or float16 logits, got {logits.dtype}; "
                            "use impl='torch' for float64")
    if inplace and not use_kernel:
        raise ValueError("inplace=True needs the Triton kernel (impl='triton', or 'auto' on CUDA)")
    if inplace and torch._debug_has_internal_overlap(logits) != 0:
        # rows or heads sharing memory (expand, as_strided): the gradient written into one would overwrite another's
        raise ValueError("inplace=True: the logits' rows or heads share memory (an expanded or overlapping view), so "
                         "the gradient cannot be written into them; pass contiguous logits or inplace=False")
    if not use_kernel:
        return _reference(logits, target, params, return_stats)
    loss, stats = _FusedCollabLoss.apply(logits, target, params, return_stats, inplace)
    if not return_stats:
        return loss
    hard, soft, correct, counts = stats.unbind(0)  # one view op, not four
    return loss, CollabStats(hard=hard, soft=soft, correct=correct, num_valid=counts[0])


def fused_collab_loss(
    logits,
    target: torch.Tensor,
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
    return_stats: bool = False,
    inplace: bool = False,
    block_c: int | None = None,
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

    Returns:
        The loss (float32, or float64 for float64 logits on the reference path; a scalar, or [H, N] for
        "none"), and a CollabStats if return_stats.

    Label values on CUDA tensors are checked in the kernel without a host sync: an out-of-range label
    makes the loss NaN. Set COLLAB_FAST_CHECK_LABELS=1 for an eager ValueError instead (one sync).
    The Triton path's gradient is not differentiable: create_graph=True through it raises.
    """
    params = CollabLossParams(temperature, beta, soft_weight, detach_consensus, ignore_index, label_smoothing,
                              reduction, impl, block_c, soft_loss, weights)
    return collab_loss(logits, target, params, return_stats=return_stats, inplace=inplace)


# ----------------------------------------------------------------------------------------------------
# Module
# ----------------------------------------------------------------------------------------------------


class CollabLoss(nn.Module):
    """nn.Module form of :func:`fused_collab_loss`: the settings (every keyword of fused_collab_loss but
    return_stats and inplace, which are per call) are validated once, here."""

    def __init__(self, temperature: float = _DEFAULT.temperature, beta: float | None = None,
                 soft_weight: float | None = None, soft_loss: str = _DEFAULT.soft_loss,
                 weights: tuple[float, float] | None = None, detach_consensus: bool = _DEFAULT.detach_consensus,
                 ignore_index: int = _DEFAULT.ignore_index, label_smoothing: float = _DEFAULT.label_smoothing,
                 reduction: str = _DEFAULT.reduction, impl: str = _DEFAULT.impl, block_c: int | None = None):
        super().__init__()
        self.params = CollabLossParams(temperature, beta, soft_weight, detach_consensus, ignore_index,
                                       label_smoothing, reduction, impl, block_c, soft_loss, weights)

    def forward(self, logits, target: torch.Tensor, return_stats: bool = False, inplace: bool = False):
        return collab_loss(logits, target, self.params, return_stats=return_stats, inplace=inplace)

    def extra_repr(self) -> str:
        p = self.params
        weights = f"weights={p.weights}" if p.weights else f"beta={p.beta}, soft_weight={p.soft_weight}"
        return (f"temperature={p.temperature}, {weights}, soft_loss={p.soft_loss!r}, "
                f"detach_consensus={p.detach_consensus}, reduction={p.reduction!r}, impl={p.impl!r}")
