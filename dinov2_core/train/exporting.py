"""Publish a phase's model: ``export/backbone.pth`` (official hub format), ``heads.pth``, ``model.json``.

The exported backbone is the EMA teacher (pretrain, highres) or the student's EMA (distill). Sharded
parameters are gathered to full tensors on rank 0, loaded strictly into a freshly built unsharded
backbone and written through :mod:`dinov2_core.models.checkpoint_io`; the directory is assembled
under a temporary name and swapped in, so ``export/`` is always complete.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from dinov2_core.models import build_backbone
from dinov2_core.models.checkpoint_io import export_backbone_dir, load_state_dict_strict
from dinov2_core.train.config import TrainConfig
from dinov2_core.utils.atomic import atomic_torch_save

HEADS_FILE = "heads.pth"


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Collective: the unsharded CPU state dict on rank 0 (empty on other ranks)."""
    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def head_config(cfg: TrainConfig) -> dict[str, Any]:
    keys = ("head_n_prototypes", "head_bottleneck_dim", "head_nlayers", "head_hidden_dim")
    return {"dino": {k: getattr(cfg.dino, k) for k in keys},
            "ibot": {**{k: getattr(cfg.ibot, k) for k in keys}, "separate_head": cfg.ibot.separate_head}}


def export_model(meta: nn.Module, cfg: TrainConfig, output_dir: str | os.PathLike, context: Any) -> Path:
    """Collective; rank 0 writes ``<output_dir>/export``. Returns the export directory."""
    from dinov2_core.train.meta_arch import backbone_kwargs

    final = Path(output_dir) / "export"
    backbone_state = full_state_dict(meta.exported_backbone())
    heads_state = {name: full_state_dict(module) for name, module in meta.exported_heads().items()}
    if context.is_main:
        backbone = build_backbone(cfg.student.arch, **backbone_kwargs(cfg, drop_path=False))
        load_state_dict_strict(backbone, backbone_state)
        tmp = Path(output_dir) / f".export-tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        atomic_torch_save({**heads_state, "config": head_config(cfg)}, tmp / HEADS_FILE)
        export_backbone_dir(backbone, tmp)  # writes model.json last
        previous = Path(output_dir) / f".export-old-{os.getpid()}"
        if final.exists():
            os.replace(final, previous)
        os.replace(tmp, final)
        shutil.rmtree(previous, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    return final
