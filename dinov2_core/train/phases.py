"""Phase-specific model construction: pretraining, 518 px adaptation (highres) and distillation.

- ``pretrain``: a fresh student; the teacher starts as its copy. ``init_from`` (optional) works as
  for highres.
- ``highres``: like pretrain, then initialised from ``init_from``: a training output directory (its
  newest complete DCP checkpoint: student, teacher, heads and loss centers), a DCP checkpoint
  directory, an export directory (teacher backbone + heads into both student and teacher) or an
  official hub ``.pth`` (backbone only; fresh heads). The position embedding is interpolated once
  to the new global crop grid and replaces the parameter.

The model is built on the meta device and materialised sharded (or plain, at one rank) before any
weights arrive: DCP checkpoints are read straight into the shards, and weight files are read on rank 0
only and broadcast (``set_model_state_dict(..., broadcast_from_rank0=True)``), so no rank holds a
full-size copy of a model it only has a shard of.
- ``distill``: the frozen teacher (backbone **and** heads) comes from ``distill.teacher_path``, a
  training output directory or its ``export/`` directory. Official hub weights carry no heads, so
  they cannot be a distillation teacher directly: first run a short ``highres`` (or ``pretrain``)
  phase with ``init_from=<hub .pth>`` to train heads for it, then distill from that run's output.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

from dinov2_core.models import DINOHead, build_backbone_from_spec
from dinov2_core.models.checkpoint_io import (
    BACKBONE_FILE,
    SPEC_FILE,
    CheckpointMismatchError,
    chunk_state_dict,
    extract_backbone_state_dict,
    read_dcp_metadata,
    safe_dcp_load,
)
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


def _read_heads(export_dir: Path, mmap: bool) -> dict[str, Any] | None:
    """``heads.pth`` of an export; ``mmap`` reads only what is touched (the head config, on every rank)."""
    heads_file = export_dir / HEADS_FILE
    if not heads_file.exists():
        return None
    return torch.load(heads_file, map_location="cpu", weights_only=True, mmap=mmap)


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _agree_on_error(error: Exception | None) -> None:
    """Collective: raise rank 0's error (a mismatch found while reading weights) on every rank."""
    box = [error]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise box[0]


def _check_state(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Strict key and shape check of a full state dict against a (sharded or meta) module."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {expected[k]}"
                    for k in set(expected) & set(state) if tuple(state[k].shape) != expected[k])
    if missing or unexpected or shapes:
        raise ConfigError(f"{what}: {CheckpointMismatchError(missing, unexpected, shapes)}")


def _broadcast_full_state(module: nn.Module, read: Callable[[], dict[str, torch.Tensor]], what: str) -> None:
    """Collective: rank 0 reads a full state dict (``read``), checks it strictly against ``module`` and
    broadcasts it into every rank's shards; no other rank holds a full copy."""
    state: dict[str, torch.Tensor] = {}
    error = None
    if _is_main():
        try:
            state = read()
            _check_state(module, state, what)
        except (ConfigError, OSError, ValueError, RuntimeError) as caught:
            error = caught if isinstance(caught, ConfigError) else ConfigError(f"{what}: {caught}")
    _agree_on_error(error)
    set_model_state_dict(module, state,
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True))


def _backbone_layout(state: dict[str, torch.Tensor], backbone: nn.Module) -> dict[str, torch.Tensor]:
    """Hub-named backbone weights → ``backbone``'s own keys (block chunks) and position-embedding grid."""
    state = resize_pos_embed(state, backbone)
    return chunk_state_dict(state, backbone.n_blocks, len(backbone.blocks) if backbone.chunked_blocks else 0)


def _init_from_dcp(meta: SSLMetaArch, checkpoint: Path) -> None:
    """Collective: read a pretraining checkpoint straight into the shards (DCP reshards); only the
    position embeddings (small) are read whole, then interpolated to this run's grid."""
    source_cfg = load_train_config(str(checkpoint.parent.parent / "config.yaml"))
    if source_cfg.phase == "distill":
        raise ConfigError(f"init_from: {checkpoint} is a distillation checkpoint; use its export/ directory instead")
    saved = read_dcp_metadata(checkpoint).state_dict_metadata
    state = get_model_state_dict(meta)
    model_keys = {key[len("model."):] for key in saved if key.startswith("model.")}
    missing, unexpected = sorted(set(state) - model_keys), sorted(model_keys - set(state))
    if missing or unexpected:
        raise ConfigError(f"init_from: checkpoint {checkpoint} does not match this config "
                          f"(missing {missing[:5]}, unexpected {unexpected[:5]}); the heads and "
                          "backbone arch must equal the source run's")
    pos_keys = [f"{side}.backbone.pos_embed" for side in ("student", "teacher")]
    for key in pos_keys:
        stored = saved[f"model.{key}"]
        state[key] = torch.empty(stored.size, dtype=stored.properties.dtype)
    loaded = {"model": state}
    safe_dcp_load(loaded, checkpoint)
    set_model_state_dict(meta, {k: v for k, v in loaded["model"].items() if k not in pos_keys},
                         options=StateDictOptions(strict=False))
    for side in ("student", "teacher"):
        backbone = getattr(meta, side)["backbone"]
        resized = resize_pos_embed({"pos_embed": loaded["model"][f"{side}.backbone.pos_embed"]}, backbone)
        set_model_state_dict(backbone, resized, options=StateDictOptions(full_state_dict=True, strict=False))
    log.info("initialised student and teacher from %s", checkpoint)


def _init_from_weights(meta: SSLMetaArch, path: Path) -> None:
    export_dir = _export_dir(path)
    has_heads = export_dir is not None and (export_dir / HEADS_FILE).exists()
    backbone_file = export_dir / BACKBONE_FILE if export_dir is not None else path

    def read_backbone() -> dict[str, torch.Tensor]:
        return extract_backbone_state_dict(torch.load(backbone_file, map_location="cpu", weights_only=True, mmap=True))

    heads = _read_heads(export_dir, mmap=True) if has_heads else None
    for side in (meta.student, meta.teacher):
        backbone = side["backbone"]
        _broadcast_full_state(backbone, lambda: _backbone_layout(read_backbone(), backbone), f"init_from {path}")
        if heads is None:
            continue
        for name, module in side.items():
            if name == "backbone":
                continue
            if name not in heads:
                raise ConfigError(f"init_from: {path} has no {name} (heads.pth holds "
                                  f"{sorted(k for k in heads if k != 'config')}); set ibot.separate_head to "
                                  "match the source run")
            _broadcast_full_state(module, lambda: dict(heads[name]), f"init_from {path} ({name})")
    if heads is None:
        log.warning("init_from %s has no heads.pth: the heads start from scratch", path)


def initialise_from(meta: SSLMetaArch, init_from: str) -> None:
    """Collective: load ``init_from`` into the materialised (sharded or plain) model."""
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


def _teacher_export_dir(cfg: TrainConfig) -> Path:
    path = Path(cfg.distill.teacher_path)
    export_dir = _export_dir(path) if path.is_dir() else None
    if export_dir is None:
        raise ConfigError(
            f"distill.teacher_path: {cfg.distill.teacher_path!r} is not a training output or export directory "
            "(model.json + backbone.pth + heads.pth). Official hub .pth files hold no DINO/iBOT heads, which "
            "distillation needs to produce targets: run a short phase with init_from=<hub .pth> first "
            "(e.g. configs/train/vitg14_highres.yaml) and distill from its output directory"
        )
    return export_dir


def distillation_teacher_skeleton(cfg: TrainConfig) -> nn.ModuleDict:
    """The frozen teacher's backbone + heads on the meta device, shaped from the export's ``model.json`` and
    the head config in ``heads.pth``; its weights come later (:func:`load_distillation_teacher_weights`)."""
    export_dir = _teacher_export_dir(cfg)
    heads = _read_heads(export_dir, mmap=True)
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
    spec = json.loads((export_dir / SPEC_FILE).read_text())
    with torch.device("meta"):
        backbone = build_backbone_from_spec(spec)
        teacher = nn.ModuleDict({"backbone": backbone})
        for name in ("dino_head", "ibot_head"):
            if name in heads:
                section = head_cfg["dino" if name == "dino_head" else "ibot"]
                teacher[name] = DINOHead(backbone.embed_dim, section["head_n_prototypes"],
                                         nlayers=section["head_nlayers"], hidden_dim=section["head_hidden_dim"],
                                         bottleneck_dim=section["head_bottleneck_dim"])
    return teacher


def load_distillation_teacher_weights(meta: SSLMetaArch, cfg: TrainConfig) -> None:
    """Collective: the frozen teacher's weights, read on rank 0 and broadcast into the shards."""
    export_dir = _teacher_export_dir(cfg)
    backbone = meta.teacher["backbone"]

    def read_backbone() -> dict[str, torch.Tensor]:
        hub = torch.load(export_dir / BACKBONE_FILE, map_location="cpu", weights_only=True, mmap=True)
        return _backbone_layout(extract_backbone_state_dict(hub), backbone)

    _broadcast_full_state(backbone, read_backbone, f"distill.teacher_path {export_dir}")
    heads = _read_heads(export_dir, mmap=True)
    for name, module in meta.teacher.items():
        if name != "backbone":
            _broadcast_full_state(module, lambda: dict(heads[name]), f"distill.teacher_path {export_dir} ({name})")


def build_phase_model(cfg: TrainConfig, context: Any) -> SSLMetaArch:
    """The phase's model on the meta device (no memory yet): shard/materialise it, then call
    :func:`initialise_phase_model`."""
    teacher = distillation_teacher_skeleton(cfg) if cfg.phase == "distill" else None
    return SSLMetaArch(cfg, teacher=teacher, on_meta=True)


def initialise_phase_model(meta: SSLMetaArch, cfg: TrainConfig) -> None:
    """Collective, after materialisation: official init of the student (and its EMA copy), then the
    weights the phase starts from (``init_from``, or the frozen distillation teacher)."""
    meta.initialise_weights()
    if cfg.phase == "distill":
        load_distillation_teacher_weights(meta, cfg)
    elif cfg.init_from:
        initialise_from(meta, cfg.init_from)
