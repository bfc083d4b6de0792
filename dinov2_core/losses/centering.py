"""Teacher-side target normalisation shared by the DINO and iBOT losses.

Two ways of turning teacher logits into target distributions (recipe §3.1/§3.2):

* **Softmax centering** with a *delayed* EMA center. ``update_center`` launches an (asynchronous)
  all-reduce of this step's batch statistics; the result is folded into the center at the start of the
  *next* ``softmax_center_teacher`` call, so the center used at step t includes batches ≤ t−1.
* **Sinkhorn-Knopp** (3 iterations, fp32, no max-subtraction), whose prototype marginals are
  normalised over all ranks.

Exact resume: the pending statistics live in registered buffers (``pending_batch_center`` and
``has_pending_update``) next to ``center``. ``state_dict()`` first waits for any in-flight all-reduce
and stores its normalised result in ``pending_batch_center``; it does **not** apply it. A module restored
from that state dict therefore applies the same pending update at its next ``softmax_center_teacher``
call as the module that saved it, so training continues bit-exactly.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


def at_least_float32(tensor: Tensor) -> Tensor:
    """Up-cast half-precision head outputs to float32; keep float32/float64 as they are (fp64 parity tests)."""
    return tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@torch.no_grad()
def sinkhorn_knopp(
    teacher_logits: Tensor,
    teacher_temp: float,
    n_iterations: int = 3,
    n_samples: Tensor | int | None = None,
) -> Tensor:
    """Sinkhorn-Knopp targets for ``teacher_logits`` (rows = samples of this rank, columns = K prototypes).

    Q = exp(z/τ)ᵀ is normalised to total mass 1 over all ranks, then ``n_iterations`` times: every
    prototype row to 1/K (row sums all-reduced) and every sample column to 1/B_glob (local). The result
    is scaled by B_glob so that each returned row sums to 1. ``n_samples`` is this rank's number of
    valid samples (default: the number of rows); B_glob is its sum over ranks. It is all-reduced in the
    same collective as ΣQ, so ranks may hold different numbers of rows.
    """
    q = torch.exp(at_least_float32(teacher_logits) / teacher_temp).t()
    n_prototypes = q.shape[0]
    local_count = q.shape[1] if n_samples is None else n_samples
    totals = torch.stack([q.sum(), torch.as_tensor(local_count, dtype=q.dtype, device=q.device).reshape(())])
    if _distributed():
        dist.all_reduce(totals)
    total_mass, n_global = totals[0], totals[1]
    q /= total_mass
    for _ in range(n_iterations):
        prototype_mass = q.sum(dim=1, keepdim=True)
        if _distributed():
            dist.all_reduce(prototype_mass)
        q /= prototype_mass
        q /= n_prototypes
        q /= q.sum(dim=0, keepdim=True)
        q /= n_global
    q *= n_global
    return q.t()


def _finish_reduction_hook(module: "DelayedCenterEMA", *args: Any) -> None:
    # Module-level (not a lambda) so that modules holding it stay picklable.
    module._finish_center_reduction()


class DelayedCenterEMA(nn.Module):
    """Base class holding a float32 EMA ``center`` whose updates are applied one call late.

    Subclasses call :meth:`_launch_center_reduction` from ``update_center`` with the sum of this rank's
    statistics and their weight (rows for DINO, 0/1 "has masked tokens" for iBOT); the new center
    contribution is Σ_ranks sum / Σ_ranks weight, exactly the official divisor (rows·world) when every
    rank has the same number of rows, and still a proper mean when they do not (skipped images).
    """

    def __init__(self, center_shape: tuple[int, ...], center_momentum: float) -> None:
        super().__init__()
        if not 0.0 <= center_momentum <= 1.0:
            raise ValueError(f"center_momentum: {center_momentum!r} must lie in [0, 1]")
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(center_shape, dtype=torch.float32))
        self.register_buffer("pending_batch_center", torch.zeros(center_shape, dtype=torch.float32))
        self.register_buffer("has_pending_update", torch.zeros((), dtype=torch.bool))
        self._in_flight: tuple[Any, Tensor] | None = None
        self.register_state_dict_pre_hook(_finish_reduction_hook)
        self.register_load_state_dict_pre_hook(_finish_reduction_hook)

    @torch.no_grad()
    def _launch_center_reduction(self, statistic_sum: Tensor, weight: float) -> None:
        # One-slot queue as in the official code: a second update before the next apply replaces the first.
        self._finish_center_reduction()
        packed = torch.cat(
            [statistic_sum.detach().float().reshape(-1), statistic_sum.new_full((1,), float(weight), dtype=torch.float32)]
        )
        work = dist.all_reduce(packed, async_op=True) if _distributed() else None
        self._in_flight = (work, packed)
        self.has_pending_update.fill_(True)

    @torch.no_grad()
    def _finish_center_reduction(self) -> None:
        """Wait for the in-flight all-reduce and store its normalised result in the pending buffer."""
        if self._in_flight is None:
            return
        work, packed = self._in_flight
        self._in_flight = None
        if work is not None:
            work.wait()
        total_weight = packed[-1]
        batch_center = packed[:-1] / total_weight.clamp(min=torch.finfo(torch.float32).tiny)
        self.pending_batch_center.copy_(batch_center.reshape(self.pending_batch_center.shape))
        # No rank contributed (e.g. no masked patch anywhere): nothing to fold in.
        self.has_pending_update.logical_and_(total_weight > 0)

    @torch.no_grad()
    def apply_pending_center_update(self) -> None:
        """Fold the statistics of the previous ``update_center`` call into ``center`` (no-op if none)."""
        self._finish_center_reduction()
        updated = self.center * self.center_momentum + self.pending_batch_center * (1 - self.center_momentum)
        self.center.copy_(torch.where(self.has_pending_update, updated, self.center))
        self.has_pending_update.fill_(False)
