"""Per-iteration schedules (lr, weight decay, teacher momentum, teacher temperature, last-layer lr).

Semantics follow the official ``CosineScheduler``: a linear warmup that includes its end point
(``linspace(start, base, W)``), then a half cosine from ``base`` to ``final`` over the remaining
``T - W`` iterations, and ``final`` for every index ``>= T``. An "epoch" is the fixed
``train.official_epoch_length`` iterations, whatever the dataset size, and the lr is scaled with the
total batch (``sqrt_wrt_1024``: ``base_lr * sqrt(B_total / 1024)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dinov2_core.train.config import TrainConfig


class CosineSchedule:
    """Values precomputed in float64; ``schedule[it]`` returns a Python float."""

    def __init__(self, base: float, final: float, total_iters: int, warmup_iters: int = 0,
                 start_warmup_value: float = 0.0) -> None:
        self.final = float(final)
        self.total_iters = int(total_iters)
        warmup = np.linspace(start_warmup_value, base, warmup_iters, dtype=np.float64)
        steps = np.arange(total_iters - warmup_iters, dtype=np.float64)
        cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * steps / max(len(steps), 1)))
        self.values = np.concatenate((warmup, cosine))
        assert len(self.values) == self.total_iters

    def __getitem__(self, iteration: int) -> float:
        if iteration >= self.total_iters:
            return self.final
        return float(self.values[iteration])


def scaled_lr(base_lr: float, total_batch: int, rule: str) -> float:
    """Peak lr for a total batch; ``sqrt_wrt_1024`` is the official rule."""
    if rule == "sqrt_wrt_1024":
        return base_lr * math.sqrt(total_batch / 1024.0)
    if rule == "linear_wrt_1024":
        return base_lr * total_batch / 1024.0
    return base_lr


@dataclass
class Schedules:
    lr: CosineSchedule
    wd: CosineSchedule
    momentum: CosineSchedule
    teacher_temp: CosineSchedule
    last_layer_lr: CosineSchedule
    peak_lr: float

    def at(self, iteration: int) -> dict[str, float]:
        return {
            "lr": self.lr[iteration],
            "wd": self.wd[iteration],
            "momentum": self.momentum[iteration],
            "teacher_temp": self.teacher_temp[iteration],
            "last_layer_lr": self.last_layer_lr[iteration],
        }


def build_schedules(cfg: TrainConfig, world_size: int) -> Schedules:
    epoch = cfg.train.official_epoch_length
    total = cfg.optim.epochs * epoch
    peak = scaled_lr(cfg.optim.base_lr, cfg.train.batch_size_per_gpu * world_size, cfg.optim.scaling_rule)
    lr_args = dict(base=peak, final=cfg.optim.min_lr, total_iters=total,
                   warmup_iters=cfg.optim.warmup_epochs * epoch, start_warmup_value=0.0)
    last_layer = CosineSchedule(**lr_args)
    # The last layer is frozen through its own lr schedule (no norm_last_layer trick as in DINO v1).
    last_layer.values[: cfg.optim.freeze_last_layer_epochs * epoch] = 0.0
    temp_iters = cfg.teacher.warmup_teacher_temp_epochs * epoch
    return Schedules(
        lr=CosineSchedule(**lr_args),
        wd=CosineSchedule(cfg.optim.weight_decay, cfg.optim.weight_decay_end, total),
        momentum=CosineSchedule(cfg.teacher.momentum_teacher, cfg.teacher.final_momentum_teacher, total),
        teacher_temp=CosineSchedule(cfg.teacher.teacher_temp, cfg.teacher.teacher_temp, temp_iters,
                                    warmup_iters=temp_iters, start_warmup_value=cfg.teacher.warmup_teacher_temp),
        last_layer_lr=last_layer,
        peak_lr=peak,
    )
