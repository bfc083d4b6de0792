"""Reference points for the report: the same backbone spec at random initialisation, and raw pixels.

Reporting a trained backbone next to these shows what pretraining bought on the same data and
protocol (a random ViT is a surprisingly strong kNN baseline on small synthetic sets; raw pixels
show how much the task is solvable without any learning).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dinov2_core.eval.features import PixelFeatures


def random_init_backbone(spec: dict[str, Any], seed: int = 0) -> nn.Module:
    """A freshly initialised backbone of ``spec`` (``{"arch", "kwargs"}``), deterministic in ``seed``."""
    from dinov2_core.models import build_backbone_from_spec

    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model = build_backbone_from_spec(spec)
    return model.eval()


def pixel_baseline(size: int = 32) -> nn.Module:
    """Raw pixels resized to ``size``² and flattened (L2-normalised by kNN / retrieval)."""
    return PixelFeatures(size)
