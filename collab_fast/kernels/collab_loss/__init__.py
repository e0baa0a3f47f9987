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

The op by layer, one module each: params (the settings, validated once, and the statistics), reference
(plain PyTorch), jit (the Triton kernel), launch (blocks, buffers, the launch), autograd (the autograd
Function and the torch.library custom ops that torch.compile sees), api (input checks, the functional API,
the nn.Module).
"""

from collab_fast.kernels.collab_loss.api import CollabLoss, collab_loss, fused_collab_loss
from collab_fast.kernels.collab_loss.params import CollabLossParams, CollabStats
from collab_fast.kernels.collab_loss.reference import collab_loss_reference

__all__ = ["CollabLoss", "CollabLossParams", "CollabStats", "collab_loss", "collab_loss_reference", "fused_collab_loss"]
