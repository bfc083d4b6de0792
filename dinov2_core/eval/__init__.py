"""Frozen-feature evaluation of DINOv2 backbones: kNN, linear grid, logistic regression, retrieval,
dense linear probe and PCA maps, reported next to random-init and raw-pixel baselines.

Entry point: ``run_evaluation(EvalConfig(...), output_dir)``; see ``docs/evaluation.md``.
"""

from dinov2_core.eval.config import EvalConfig
from dinov2_core.eval.runner import run_evaluation

__all__ = ["EvalConfig", "run_evaluation"]
