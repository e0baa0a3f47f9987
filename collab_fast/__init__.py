"""collab_fast: a fast training engine for collaborative learning (Song & Chai, NeurIPS 2018)."""

from collab_fast.kernels.collab_loss import (
    CollabLoss,
    CollabLossParams,
    CollabStats,
    collab_loss_reference,
    fused_collab_loss,
)
from collab_fast.kernels.fused_linear import FusedLinearCollabLoss, fused_linear_collab_loss
from collab_fast.rescale import GradRescale, branch, grad_rescale

__version__ = "0.1.0"

__all__ = [
    "CollabLoss",
    "CollabLossParams",
    "CollabStats",
    "FusedLinearCollabLoss",
    "GradRescale",
    "branch",
    "collab_loss_reference",
    "fused_collab_loss",
    "fused_linear_collab_loss",
    "grad_rescale",
    "__version__",
]
