"""DINOv2 training: FSDP2 self-distillation (pretrain), 518 px adaptation and distillation.

``load_train_config(path, overrides)`` reads and validates a recipe from ``configs/train``;
``run_training(cfg, output_dir, metrics_callback=None)`` runs one phase into ``output_dir``
(checkpoints/, metrics.jsonl, export/, config.yaml) and returns a summary dict;
``export_from_checkpoint(cfg, output_dir)`` re-exports from a checkpoint on demand.
"""

from __future__ import annotations

from typing import Any

from dinov2_core.train.config import TrainConfig, load_train_config


def run_training(cfg: TrainConfig, output_dir: Any, metrics_callback: Any = None) -> dict[str, Any]:
    """See :func:`dinov2_core.train.trainer.run_training` (imported lazily: it pulls in the models)."""
    from dinov2_core.train.trainer import run_training as _run

    return _run(cfg, output_dir, metrics_callback)


def export_from_checkpoint(cfg: TrainConfig, output_dir: Any, checkpoint: Any = None) -> Any:
    """Re-export ``<output_dir>/export`` from a checkpoint without training (newest complete one by default)."""
    from dinov2_core.train.trainer import export_from_checkpoint as _export

    return _export(cfg, output_dir, checkpoint)


__all__ = ["TrainConfig", "export_from_checkpoint", "load_train_config", "run_training"]
