"""Non-finite loss guard: skip bad steps, restore from the last checkpoint, then stop with advice.

A step whose total loss is NaN/inf (on any rank) is not applied. After ``max_consecutive_bad_steps``
bad steps in a row the trainer reloads the newest complete checkpoint (at most ``max_restores``
times); beyond that :class:`TrainingDivergedError` names the loss, the step and what to try.
"""

from __future__ import annotations

import math
from typing import Callable


class TrainingDivergedError(RuntimeError):
    """Training produced non-finite losses and restoring did not help."""


HINTS = ("lower optim.base_lr (or lengthen optim.warmup_epochs)", "lower student.drop_path_rate",
         "lower dino.koleo_loss_weight", "raise train.batch_size_per_gpu (KoLeo and centering are noisy on tiny batches)",
         "use parallel.mixed_precision=fp32 to rule out bf16 overflow")


class NanGuard:
    def __init__(self, max_consecutive_bad_steps: int, max_restores: int) -> None:
        self.max_consecutive_bad_steps = max_consecutive_bad_steps
        self.max_restores = max_restores
        self.consecutive_bad = 0
        self.restores = 0

    @staticmethod
    def bad_losses(losses: dict[str, float]) -> list[str]:
        return [name for name, value in losses.items() if not math.isfinite(value)]

    def observe(self, iteration: int, losses: dict[str, float], can_restore: Callable[[], bool]) -> str:
        """Returns ``ok``, ``skip`` (do not apply this step) or ``restore``; raises when out of options.
        ``can_restore`` (is there a complete checkpoint?) is only asked after bad steps: it lists files."""
        bad = self.bad_losses(losses)
        if not bad:
            self.consecutive_bad = 0
            return "ok"
        self.consecutive_bad += 1
        can_restore = can_restore()
        if self.consecutive_bad <= self.max_consecutive_bad_steps:
            return "skip"
        if can_restore and self.restores < self.max_restores:
            self.restores += 1
            self.consecutive_bad = 0
            return "restore"
        raise TrainingDivergedError(
            f"non-finite loss at iteration {iteration}: {', '.join(f'{n}={losses[n]}' for n in bad)} "
            f"({self.consecutive_bad} bad steps in a row, {self.restores} restore(s) from checkpoint already tried"
            f"{'' if can_restore else '; no complete checkpoint to restore'}). Try: " + "; ".join(HINTS)
        )
