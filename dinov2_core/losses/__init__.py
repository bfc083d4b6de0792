"""Self-distillation losses of the DINOv2 recipe: DINO (cls token), iBOT (masked patches), KoLeo."""

from dinov2_core.losses.centering import DelayedCenterEMA, sinkhorn_knopp
from dinov2_core.losses.dino_clstoken import DINOCropLosses, DINOLoss, dino_global_and_local_terms, dino_loss_term_counts
from dinov2_core.losses.ibot_patch import iBOTPatchLoss
from dinov2_core.losses.koleo import KoLeoLoss

__all__ = [
    "DINOCropLosses",
    "DINOLoss",
    "DelayedCenterEMA",
    "KoLeoLoss",
    "dino_global_and_local_terms",
    "dino_loss_term_counts",
    "iBOTPatchLoss",
    "sinkhorn_knopp",
]
