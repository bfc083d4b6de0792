"""AdamW parameter groups: layer-wise lr decay, patch-embed lr multiplier, weight-decay multipliers.

Per parameter (names relative to the student ``ModuleDict``: ``backbone.*``, ``dino_head.*``,
``ibot_head.*``):

- ``lr_multiplier = layerwise_decay ** (n_blocks + 1 - layer_id)`` where ``layer_id`` is 0 for the
  embeddings and tokens, ``i + 1`` for block ``i`` (global index, chunked or not) and ``n_blocks + 1``
  for everything else (final norm, heads); ``patch_embed.*`` gets another ``patch_embed_lr_mult``.
- ``wd_multiplier = 0`` for biases and for names containing ``norm`` or ``gamma`` (LayerScale).
- ``is_last_layer`` for ``last_layer`` parameters of both heads: their lr follows the last-layer
  schedule, which is 0 during the first ``freeze_last_layer_epochs``.

Parameters with equal (lr_multiplier, wd_multiplier, is_last_layer) share one optimizer group.
"""

from __future__ import annotations

import re
from typing import Iterable

import torch

_EMBEDDING_NAMES = ("pos_embed", "patch_embed", "mask_token", "cls_token", "register_tokens")
_CHUNKED_BLOCK = re.compile(r"(?:^|\.)blocks\.\d+\.(\d+)\.")
_PLAIN_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


def layer_id(name: str, n_blocks: int, chunked: bool) -> int:
    """0 for embeddings, i+1 for block i, n_blocks+1 for anything after the blocks or outside the backbone."""
    if not name.startswith("backbone."):
        return n_blocks + 1
    local = name[len("backbone."):]
    if local.split(".")[0] in _EMBEDDING_NAMES:
        return 0
    match = (_CHUNKED_BLOCK if chunked else _PLAIN_BLOCK).search(name)
    if match:
        return int(match.group(1)) + 1
    return n_blocks + 1


def param_multipliers(name: str, n_blocks: int, chunked: bool, layerwise_decay: float,
                      patch_embed_lr_mult: float) -> dict[str, float | bool]:
    lr_multiplier = layerwise_decay ** (n_blocks + 1 - layer_id(name, n_blocks, chunked))
    if "patch_embed" in name:
        lr_multiplier *= patch_embed_lr_mult
    no_decay = name.endswith(".bias") or "norm" in name or "gamma" in name
    return {
        "lr_multiplier": lr_multiplier,
        "wd_multiplier": 0.0 if no_decay else 1.0,
        "is_last_layer": "last_layer" in name,
    }


def build_param_groups(named_parameters: Iterable[tuple[str, torch.nn.Parameter]], n_blocks: int,
                       chunked: bool, layerwise_decay: float, patch_embed_lr_mult: float) -> list[dict]:
    """Optimizer groups fused by identical multipliers; each group carries its multipliers and names."""
    groups: dict[tuple, dict] = {}
    for name, param in named_parameters:
        if not param.requires_grad:
            continue
        mult = param_multipliers(name, n_blocks, chunked, layerwise_decay, patch_embed_lr_mult)
        key = (mult["lr_multiplier"], mult["wd_multiplier"], mult["is_last_layer"])
        group = groups.setdefault(key, {"params": [], "names": [], **mult})
        group["params"].append(param)
        group["names"].append(name)
    return list(groups.values())


def apply_schedule_to_groups(optimizer: torch.optim.Optimizer, lr: float, wd: float, last_layer_lr: float) -> None:
    """Set each group's lr and weight decay for the current iteration."""
    for group in optimizer.param_groups:
        base = last_layer_lr if group["is_last_layer"] else lr
        group["lr"] = base * group["lr_multiplier"]
        group["weight_decay"] = wd * group["wd_multiplier"]
