"""DINO image-level (cls-token) self-distillation loss and its multi-crop combination (recipe §3.1).

``DINOLoss`` turns teacher logits into targets (softmax centering with a delayed EMA center, or
Sinkhorn-Knopp) and computes Σ_pairs −mean_rows Σ_k p_k log q_k. ``dino_global_and_local_terms``
applies the recipe's pairing and normalisation so the meta-architecture does not re-derive it.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from dinov2_core.losses.centering import DelayedCenterEMA, at_least_float32, sinkhorn_knopp


class DINOLoss(DelayedCenterEMA):
    """Cross-entropy between teacher targets and student distributions over ``out_dim`` prototypes.

    Buffers (all float32 / bool, all in ``state_dict``): ``center`` (1, K), ``pending_batch_center``
    (1, K), ``has_pending_update`` (). See :mod:`dinov2_core.losses.centering` for the delayed update.
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__((1, out_dim), center_momentum)
        self.student_temp = student_temp

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_output: Tensor, teacher_temp: float) -> Tensor:
        """softmax((z − c)/τt) after folding in the previous step's center statistics."""
        self.apply_pending_center_update()
        return F.softmax((teacher_output - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_output: Tensor, teacher_temp: float, n_iterations: int = 3) -> Tensor:
        """Sinkhorn-Knopp targets; each row sums to 1. Collective over all ranks when distributed."""
        return sinkhorn_knopp(teacher_output, teacher_temp, n_iterations)

    def forward(self, student_output_list: Sequence[Tensor], teacher_out_softmaxed_centered_list: Sequence[Tensor]) -> Tensor:
        """Σ over every (student chunk, teacher chunk) pair of −mean_rows Σ_k p_k·log_softmax(s/τs)_k.

        The student log-softmax is computed in at least float32 (as dinov3 does), whatever the head's dtype.
        """
        total = student_output_list[0].new_zeros((), dtype=torch.float32)
        for student_logits in student_output_list:
            student_log_probs = F.log_softmax(at_least_float32(student_logits) / self.student_temp, dim=-1)
            for teacher_probs in teacher_out_softmaxed_centered_list:
                total = total - torch.sum(teacher_probs * student_log_probs, dim=-1).mean()
        return total

    @torch.no_grad()
    def update_center(self, teacher_output: Tensor) -> None:
        """Start the (asynchronous) reduction of this step's teacher logits; applied at the next softmax call."""
        self._launch_center_reduction(teacher_output.float().sum(dim=0), teacher_output.shape[0])


class DINOCropLosses(NamedTuple):
    """The two logged DINO terms, already normalised; L_DINO = weight·(local + global)."""

    local_crops_loss: Tensor
    global_crops_loss: Tensor


def dino_loss_term_counts(n_local_crops: int, n_global_crops: int = 2) -> tuple[int, int]:
    """(n_global_terms, n_local_terms) of the official normaliser.

    n_global_terms = (G−1)·G (2 for G=2: the two cross-view pairs, no same-view pair);
    n_local_terms = max(L·G, 1) (16 for L=8; the official code keeps a floor of 1 when L=0).
    """
    return (n_global_crops - 1) * n_global_crops, max(n_local_crops * n_global_crops, 1)


def dino_global_and_local_terms(
    dino_loss: DINOLoss,
    student_global_logits: Tensor,
    student_local_logits: Tensor | None,
    teacher_global_probs: Tensor,
    *,
    teacher_order: Literal["natural", "swapped"],
) -> DINOCropLosses:
    """The recipe's DINO combination for 2 global crops and L local crops (crop-major rows).

    Args:
        student_global_logits: (2B, K) student head output on the (masked) global crops, [view1; view2].
        student_local_logits: (L·B, K) on the local crops, crop-major, or ``None``/empty when L = 0.
        teacher_global_probs: (2B, K) teacher targets (after centering or Sinkhorn-Knopp).
        teacher_order: ``"natural"`` if ``teacher_global_probs`` rows are [view1; view2];
            ``"swapped"`` if they are already [view2; view1], as in the official meta-arch, which swaps
            the teacher cls halves before its head.

    With n_global_terms, n_local_terms = :func:`dino_loss_term_counts` (2 and 16 for L = 8, so the
    normaliser is 18):

    * local  = Σ_{local chunk l} Σ_{teacher view v} term(l, v) / 18                (16 terms)
    * global = mean over the 2B student global rows against the swapped teacher rows × 2 / 18,
      i.e. (term(s1, t2) + term(s2, t1)) / 18 — no same-view term.
    """
    if teacher_order not in ("natural", "swapped"):
        raise ValueError(f"teacher_order: {teacher_order!r} is not one of ['natural', 'swapped']")
    if teacher_global_probs.shape[0] % 2 or teacher_global_probs.shape[0] != student_global_logits.shape[0]:
        raise ValueError(
            f"expected 2B rows for both global tensors, got student {student_global_logits.shape[0]} "
            f"and teacher {teacher_global_probs.shape[0]}"
        )
    n_images = teacher_global_probs.shape[0] // 2
    first_half, second_half = teacher_global_probs.chunk(2)
    swapped = torch.cat([second_half, first_half]) if teacher_order == "natural" else teacher_global_probs
    teacher_views = list(swapped.chunk(2))

    n_local_rows = 0 if student_local_logits is None else student_local_logits.shape[0]
    if n_local_rows % max(n_images, 1):
        raise ValueError(f"local rows ({n_local_rows}) are not a multiple of the batch size ({n_images})")
    n_local_crops = n_local_rows // n_images if n_images else 0
    n_global_terms, n_local_terms = dino_loss_term_counts(n_local_crops)
    normaliser = n_global_terms + n_local_terms

    if n_local_crops > 0:
        local = dino_loss(list(student_local_logits.chunk(n_local_crops)), teacher_views) / normaliser
    else:
        local = student_global_logits.new_zeros((), dtype=torch.float32)
    global_ = dino_loss([student_global_logits], [swapped]) * 2 / normaliser
    return DINOCropLosses(local_crops_loss=local, global_crops_loss=global_)
