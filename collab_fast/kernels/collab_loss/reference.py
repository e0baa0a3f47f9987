"""The collaborative loss as a plain PyTorch composition (autograd gives its gradient): the ground truth of
the kernel's tests and what impl="torch" runs. Computes in float32, or float64 when the logits are float64."""

from __future__ import annotations

import torch

from collab_fast.kernels.collab_loss.params import DEFAULT, CollabLossParams, CollabStats

__all__ = ["collab_loss_reference", "reference"]


def collab_loss_reference(
    logits: torch.Tensor,
    target: torch.Tensor,
    temperature: float = DEFAULT.temperature,
    beta: float | None = None,
    soft_weight: float | None = None,
    detach_consensus: bool = DEFAULT.detach_consensus,
    ignore_index: int = DEFAULT.ignore_index,
    label_smoothing: float = DEFAULT.label_smoothing,
    reduction: str = DEFAULT.reduction,
    return_stats: bool = False,
    soft_loss: str = DEFAULT.soft_loss,
    weights: tuple[float, float] | None = None,
):
    """The collaborative loss as a composition of PyTorch ops. logits [H, N, C], target [N]."""
    params = CollabLossParams(temperature=temperature, beta=beta, soft_weight=soft_weight,
                              detach_consensus=detach_consensus, ignore_index=ignore_index,
                              label_smoothing=label_smoothing, reduction=reduction, impl="torch", soft_loss=soft_loss,
                              weights=weights)
    return reference(logits, target, params, return_stats)


def reference(logits: torch.Tensor, target: torch.Tensor, params: CollabLossParams, return_stats: bool = False,
              soft_factor: torch.Tensor | None = None):
    """collab_loss_reference with its settings already validated in `params` (what impl="torch" runs);
    soft_factor (a one-element tensor) multiplies the soft objective's coefficient."""
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
        soft_coef = p.soft_coef if soft_factor is None else p.soft_coef * soft_factor.reshape(()).to(z.dtype)
        per = p.hard_coef * hard + soft_coef * soft

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

