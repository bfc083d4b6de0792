"""iBOT masked-patch self-distillation loss (recipe §3.2).

Only global crops take part. The student sees masked crops, the teacher the same crops unmasked; the
loss compares them on the masked tokens only, gathered with the flat ``mask_indices_list`` produced by
:func:`dinov2_core.data.collate.collate_data_and_cast`. Token j of crop i is weighted by
1/(#masked tokens in crop i) and the sum is divided by the number of global crops (2B), so every crop
counts equally and crops without masked tokens contribute 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dinov2_core.losses.centering import DelayedCenterEMA, at_least_float32, sinkhorn_knopp


class iBOTPatchLoss(DelayedCenterEMA):  # noqa: N801 - official class name, kept for the trainer
    """Cross-entropy between teacher targets and student distributions of masked patch tokens.

    Buffers: ``center`` (1, 1, K) float32 plus the pending-update buffers of
    :class:`~dinov2_core.losses.centering.DelayedCenterEMA`.
    """

    def __init__(self, patch_out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__((1, 1, patch_out_dim), center_momentum)
        self.student_temp = student_temp

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_patch_tokens: Tensor, teacher_temp: float) -> Tensor:
        """softmax((z − c)/τt) after folding in the previous step's center statistics."""
        self.apply_pending_center_update()
        return F.softmax((teacher_patch_tokens - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(
        self, teacher_output: Tensor, teacher_temp: float, n_masked_patches_tensor: Tensor, n_iterations: int = 3
    ) -> Tensor:
        """Sinkhorn-Knopp over the masked tokens of all ranks.

        ``teacher_output`` is (M, K) for this rank's M masked tokens and ``n_masked_patches_tensor`` holds
        M; the column normaliser is the *global* masked count (all-reduced when distributed). Unlike the
        official code the caller's tensor is not modified in place and no process group is required.
        """
        return sinkhorn_knopp(teacher_output, teacher_temp, n_iterations, n_samples=n_masked_patches_tensor.sum())

    def forward_masked(
        self,
        student_patch_tokens_masked: Tensor,
        teacher_patch_tokens_masked: Tensor,
        student_masks_flat: Tensor,
        n_masked_patches: int | None = None,
        masks_weight: Tensor | None = None,
    ) -> Tensor:
        """Σ_j w_j·CE_j / n_crops over the masked tokens.

        Args:
            student_patch_tokens_masked: (M, K) student logits (rows beyond ``n_masked_patches`` ignored).
            teacher_patch_tokens_masked: (M, K) teacher targets.
            student_masks_flat: (n_crops, N) bool masks; its first dim is the divisor.
            n_masked_patches: M, to drop the padding of a static ``upperbound`` buffer.
            masks_weight: (M,) per-token weights 1/#masked(crop); derived from the masks if ``None``.
        """
        student_log_probs = F.log_softmax(at_least_float32(student_patch_tokens_masked) / self.student_temp, dim=-1)
        negative_ce = torch.sum(at_least_float32(teacher_patch_tokens_masked) * student_log_probs, dim=-1)
        if masks_weight is None:
            per_crop_weight = 1 / student_masks_flat.sum(-1).clamp(min=1.0)
            masks_weight = per_crop_weight.unsqueeze(-1).expand_as(student_masks_flat)[student_masks_flat]
        if n_masked_patches is not None:
            negative_ce = negative_ce[:n_masked_patches]
        return -(negative_ce * masks_weight).sum() / student_masks_flat.shape[0]

    @torch.no_grad()
    def update_center(self, teacher_patch_tokens: Tensor) -> None:
        """Start the reduction of this rank's mean masked-token logits; applied at the next softmax call.

        Accepts (M, K) or the official (G, M, K) layout (the mean over M of each group, summed over G).
        The new center contribution is the mean of per-rank means (not token-weighted); a rank with
        no masked token contributes nothing instead of a NaN.
        """
        tokens = teacher_patch_tokens.float()
        if tokens.dim() == 2:
            tokens = tokens.unsqueeze(0)
        n_groups, n_tokens = tokens.shape[0], tokens.shape[1]
        if n_tokens == 0:
            self._launch_center_reduction(tokens.new_zeros(tokens.shape[-1]), 0)
        else:
            self._launch_center_reduction(tokens.mean(dim=1).sum(dim=0), n_groups)
