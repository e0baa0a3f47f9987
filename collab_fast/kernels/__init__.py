"""Triton kernels of collab_fast (shipped inside the package)."""

from collab_fast.kernels.collab_loss import (
    CollabLoss,
    CollabLossParams,
    CollabStats,
    collab_loss_reference,
    fused_collab_loss,
)
from collab_fast.kernels.fused_linear import FusedLinearCollabLoss, fused_linear_collab_loss

__all__ = ["CollabLoss", "CollabLossParams", "CollabStats", "FusedLinearCollabLoss", "collab_loss_reference",
           "fused_collab_loss", "fused_linear_collab_loss"]
