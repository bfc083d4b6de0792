"""DINOv2 training: FSDP2 self-distillation (pretrain), 518 px adaptation and distillation.

``load_train_config(path, overrides)`` reads and validates a recipe from ``configs/train``;
``run_training(cfg, output_dir, metrics_callback=None)`` runs one phase into ``output_dir``
(checkpoints/, metrics.jsonl, export/, config.yaml) and returns a summary dict.
"""

from __future__ import annotations

from typing import Any

from dinov2_core.train.config import TrainConfig, load_train_config


def run_training(cfg: TrainConfig, output_dir: Any, metrics_callback: Any = None) -> dict[str, Any]:
    """See :func:`dinov2_core.train.trainer.run_training` (imported lazily: it pulls in the models)."""
    from dinov2_core.train.trainer import run_training as _run

    return _run(cfg, output_dir, metrics_callback)


__all__ = ["TrainConfig", "load_train_config", "run_training"]
