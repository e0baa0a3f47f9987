"""collab_fast: a fast training engine for collaborative learning (Song & Chai, NeurIPS 2018)."""

from collab_fast.kernels.collab_loss import CollabLoss, CollabStats, collab_loss_reference, fused_collab_loss

__version__ = "0.1.0"

__all__ = ["CollabLoss", "CollabStats", "collab_loss_reference", "fused_collab_loss", "__version__"]
