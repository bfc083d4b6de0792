"""Phase-specific model construction: pretraining, 518 px adaptation (highres) and distillation.

- ``pretrain``: a fresh student; the teacher starts as its copy. ``init_from`` (optional) works as
  for highres.
- ``highres``: like pretrain, then initialised from ``init_from``: a training output directory (its
  newest complete DCP checkpoint: student, teacher, heads and loss centers), a DCP checkpoint
  directory, an export directory (teacher backbone + heads into both student and teacher) or an
  official hub ``.pth`` (backbone only; fresh heads). The position embedding is interpolated once
  to the new global crop grid and replaces the parameter.
- ``distill``: the frozen teacher (backbone **and** heads) comes from ``distill.teacher_path``, a
  training output directory or its ``export/`` directory. Official hub weights carry no heads, so
  they cannot be a distillation teacher directly: first run a short ``highres`` (or ``pretrain``)
  phase with ``init_from=<hub .pth>`` to train heads for it, then distill from that run's output.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from dinov2_core.models import DINOHead
from dinov2_core.models.checkpoint_io import extract_backbone_state_dict, load_backbone, load_state_dict_strict
from dinov2_core.models.layers.pos_embed import interpolate_pos_embed
from dinov2_core.train.checkpointing import CheckpointManager
from dinov2_core.train.config import TrainConfig, load_train_config
from dinov2_core.train.exporting import HEADS_FILE
from dinov2_core.train.meta_arch import SSLMetaArch
from dinov2_core.utils.config import ConfigError

log = logging.getLogger(__name__)


def resize_pos_embed(state: dict[str, torch.Tensor], backbone: nn.Module) -> dict[str, torch.Tensor]:
    """Interpolate ``pos_embed`` in a backbone state dict to ``backbone``'s grid (no-op if equal)."""
    target = backbone.pos_embed
    source = state.get("pos_embed")
    if source is None or source.shape == target.shape:
        return state
    grid = int(round((target.shape[1] - 1) ** 0.5))
    resized = interpolate_pos_embed(source, grid, grid, offset=backbone.interpolate_offset,
                                    antialias=backbone.interpolate_antialias)
    log.info("interpolated pos_embed %s -> %s", tuple(source.shape), tuple(resized.shape))
    return {**state, "pos_embed": resized}


def _export_dir(path: Path) -> Path | None:
    for candidate in (path, path / "export"):
        if (candidate / "model.json").exists() and (candidate / "backbone.pth").exists():
            return candidate
    return None


def _dcp_checkpoint(path: Path) -> Path | None:
    if (path / ".metadata").exists():
        return path
    if (path / "checkpoints").is_dir():
        return CheckpointManager(path, keep_last=1).latest()
    return None


def _load_heads(export_dir: Path) -> dict[str, Any] | None:
    heads_file = export_dir / HEADS_FILE
    if not heads_file.exists():
        return None
    return torch.load(heads_file, map_location="cpu", weights_only=True)


def _init_from_dcp(meta: SSLMetaArch, checkpoint: Path) -> None:
    source_cfg = load_train_config(str(checkpoint.parent.parent / "config.yaml"))
    if source_cfg.phase == "distill":
        raise ConfigError(f"init_from: {checkpoint} is a distillation checkpoint; use its export/ directory instead")
    source = SSLMetaArch(source_cfg)
    state = {"model": source.state_dict()}
    dcp.load(state, checkpoint_id=str(checkpoint))
    adapted = dict(state["model"])
    for side in ("student", "teacher"):
        prefix = f"{side}.backbone."
        backbone_state = {k[len(prefix):]: v for k, v in adapted.items() if k.startswith(prefix)}
        backbone_state = resize_pos_embed(backbone_state, getattr(meta, side)["backbone"])
        adapted.update({prefix + k: v for k, v in backbone_state.items()})
    missing, unexpected = meta.load_state_dict(adapted, strict=False)
    if missing or unexpected:
        raise ConfigError(f"init_from: checkpoint {checkpoint} does not match this config "
                          f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}); the heads and "
                          "backbone arch must equal the source run's")
    log.info("initialised student and teacher from %s", checkpoint)


def _init_from_weights(meta: SSLMetaArch, path: Path) -> None:
    export_dir = _export_dir(path)
    if export_dir is not None:
        backbone_state = load_backbone(str(export_dir)).state_dict()
        heads = _load_heads(export_dir)
    else:
        backbone_state = extract_backbone_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        heads = None
    for side in (meta.student, meta.teacher):
        load_state_dict_strict(side["backbone"], resize_pos_embed(backbone_state, side["backbone"]))
        for name, module in side.items():
            if name == "backbone":
                continue
            if heads is None:
                continue
            if name not in heads:
                raise ConfigError(f"init_from: {path} has no {name} (heads.pth holds {sorted(heads)}); "
                                  "set ibot.separate_head to match the source run")
            module.load_state_dict(heads[name], strict=True)
    if heads is None:
        log.warning("init_from %s has no heads.pth: the heads start from scratch", path)


def initialise_from(meta: SSLMetaArch, init_from: str) -> None:
    path = Path(init_from)
    if not path.exists():
        raise ConfigError(f"init_from: {init_from!r} does not exist")
    checkpoint = _dcp_checkpoint(path) if path.is_dir() else None
    if checkpoint is not None:
        _init_from_dcp(meta, checkpoint)
    elif path.is_file() or _export_dir(path) is not None:
        _init_from_weights(meta, path)
    else:
        raise ConfigError(f"init_from: {init_from!r} is neither a training output directory, a DCP checkpoint, "
                          "an export directory (model.json + backbone.pth) nor a .pth file")


def load_distillation_teacher(cfg: TrainConfig) -> nn.ModuleDict:
    """Frozen teacher backbone + heads from a training output directory or its export directory."""
    path = Path(cfg.distill.teacher_path)
    export_dir = _export_dir(path) if path.is_dir() else None
    if export_dir is None:
        raise ConfigError(
            f"distill.teacher_path: {cfg.distill.teacher_path!r} is not a training output or export directory "
            "(model.json + backbone.pth + heads.pth). Official hub .pth files hold no DINO/iBOT heads, which "
            "distillation needs to produce targets: run a short phase with init_from=<hub .pth> first "
            "(e.g. configs/train/vitg14_highres.yaml) and distill from its output directory"
        )
    heads = _load_heads(export_dir)
    if heads is None:
        raise ConfigError(f"distill.teacher_path: {export_dir} has no {HEADS_FILE}; distillation needs the "
                          "teacher's DINO/iBOT heads (see docs/training.md, 'Distillation')")
    head_cfg = heads["config"]
    expected = {f"dino.{k}": v for k, v in head_cfg["dino"].items()}
    expected["ibot.separate_head"] = head_cfg["ibot"]["separate_head"]
    if head_cfg["ibot"]["separate_head"]:
        expected.update({f"ibot.{k}": v for k, v in head_cfg["ibot"].items() if k != "separate_head"})
    for key, value in expected.items():
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) != value:
            raise ConfigError(f"{key}: {getattr(getattr(cfg, section), name)!r} differs from the teacher's "
                              f"{value!r}; allowed: {value!r} (student heads project to the teacher's prototypes)")
    backbone = load_backbone(str(export_dir))
    teacher = nn.ModuleDict({"backbone": backbone})
    for name in ("dino_head", "ibot_head"):
        if name in heads:
            section = head_cfg["dino" if name == "dino_head" else "ibot"]
            head = DINOHead(backbone.embed_dim, section["head_n_prototypes"], nlayers=section["head_nlayers"],
                            hidden_dim=section["head_hidden_dim"], bottleneck_dim=section["head_bottleneck_dim"])
            head.load_state_dict(heads[name], strict=True)
            teacher[name] = head
    return teacher


def build_phase_model(cfg: TrainConfig, context: Any) -> SSLMetaArch:
    if cfg.phase == "distill":
        return SSLMetaArch(cfg, teacher=load_distillation_teacher(cfg))
    meta = SSLMetaArch(cfg)
    if cfg.init_from:
        initialise_from(meta, cfg.init_from)
    return meta
