"""DINOv2 backbones, heads and official-checkpoint I/O.

Build a backbone by name (``build_backbone("vit_small", patch_size=14, img_size=518, ...)``) or from
a JSON *backbone spec* ``{"arch": ..., "kwargs": {...}}`` (``build_backbone_from_spec``);
``backbone_spec(model)`` returns the spec that rebuilds ``model``.
"""

from __future__ import annotations

import copy
from typing import Any

from dinov2_core.models.heads import DINOHead
from dinov2_core.models.vision_transformer import (
    ARCH_NAMES,
    BlockChunk,
    DinoVisionTransformer,
    vit_base,
    vit_giant2,
    vit_large,
    vit_small,
    vit_test,
    vit_tiny,
)

_BUILDERS = {
    "vit_test": vit_test,
    "vit_tiny": vit_tiny,
    "vit_small": vit_small,
    "vit_base": vit_base,
    "vit_large": vit_large,
    "vit_giant2": vit_giant2,
}


def build_backbone(arch: str, **kwargs: Any) -> DinoVisionTransformer:
    """Build ``arch`` (one of ``ARCH_NAMES``) with the official builder keyword arguments."""
    if arch not in _BUILDERS:
        raise ValueError(f"unknown backbone arch {arch!r}; allowed: {list(ARCH_NAMES)}")
    return _BUILDERS[arch](**kwargs)


def build_backbone_from_spec(spec: dict[str, Any]) -> DinoVisionTransformer:
    """Build from ``{"arch": str, "kwargs": {...}}`` (the ``model.json`` of an export)."""
    if not isinstance(spec, dict) or "arch" not in spec:
        raise ValueError(f"a backbone spec is a dict {{'arch': ..., 'kwargs': {{...}}}}; got {spec!r}")
    unknown = sorted(set(spec) - {"arch", "kwargs"})
    if unknown:
        raise ValueError(f"unknown backbone spec keys {unknown}; allowed: ['arch', 'kwargs']")
    return build_backbone(spec["arch"], **dict(spec.get("kwargs") or {}))


def backbone_spec(model: DinoVisionTransformer) -> dict[str, Any]:
    """The spec that rebuilds ``model`` (only for models made by a builder or ``build_backbone``)."""
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    arch = getattr(model, "arch", None)
    if arch is None:
        raise ValueError("backbone_spec needs a model built by build_backbone or a vit_* builder")
    return {"arch": arch, "kwargs": copy.deepcopy(model.builder_kwargs)}


__all__ = [
    "ARCH_NAMES",
    "BlockChunk",
    "DINOHead",
    "DinoVisionTransformer",
    "backbone_spec",
    "build_backbone",
    "build_backbone_from_spec",
    "vit_base",
    "vit_giant2",
    "vit_large",
    "vit_small",
    "vit_test",
    "vit_tiny",
]
