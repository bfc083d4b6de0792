"""Export a trained backbone so that other code bases load it unchanged: the official hub layout, timm,
Hugging Face ``transformers``, and the full training state (student + teacher + DINO/iBOT heads).

Pure PyTorch: nothing here imports timm or transformers. Each export is a directory holding the
weights, the files its library reads (``config.json`` for transformers) and ``export_info.json``
(format, image size, the one call that loads it, source). Key conversion starts from the hub-format
state dict of :func:`dinov2_core.models.checkpoint_io.to_official_state_dict`.

Before conversion the state dict is *completed*: a missing LayerScale becomes ``gamma = 1`` and a
missing Linear bias becomes zeros. Both are exact (multiply by one, add zero) and give every export
the layout the official builders, timm and transformers construct (LayerScale and biases always on).

Position embeddings: ``hub`` resizes ``pos_embed`` to the 518-px grid of the official builders (for
patch 14) with :func:`dinov2_core.models.layers.pos_embed.interpolate_pos_embed` and the model's own
interpolation family, i.e. the tensor the official model computes at run time for a 518-px input;
``timm`` and ``hf`` keep the training grid unless an ``img_size`` is given. Each export reproduces the
backbone exactly at its recorded ``img_size``; at other sizes every library resizes with its own rule.

Weights are written with ``safetensors`` when that package is installed (it comes with timm and
transformers), else with ``torch.save`` (``.pth`` / ``pytorch_model.bin``); the hub file is always a
``torch.save`` file, as the official loaders expect.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import torch
from torch import Tensor, nn

from dinov2_core.models import backbone_spec, build_backbone_from_spec
from dinov2_core.models.checkpoint_io import (
    SPEC_FILE,
    infer_backbone_spec,
    load_backbone,
    load_state_dict_strict,
    read_dcp_metadata,
    safe_dcp_load,
    safe_torch_load,
    to_official_state_dict,
)
from dinov2_core.models.heads import DINOHead
from dinov2_core.models.layers.block import LAYER_NORM_EPS
from dinov2_core.models.layers.pos_embed import interpolate_pos_embed
from dinov2_core.models.layers.swiglu_ffn import swiglu_hidden_features
from dinov2_core.models.vision_transformer import DinoVisionTransformer, arch_dims
from dinov2_core.utils.atomic import atomic_torch_save, atomic_write_bytes, atomic_write_json

FORMATS: tuple[str, ...] = ("hub", "timm", "hf", "full")
INFO_FILE = "export_info.json"
HUB_WEIGHTS_FILE = "backbone.pth"
HUB_IMG_SIZE = 518  # every official hub builder constructs img_size=518 (37x37 patches of 14 px)
TRAINING_STATE_SPEC = "training_state.json"
TRAINING_STATE_FORMAT = "dinov2-pipeline-training-state"
WeightsFormat = Literal["auto", "safetensors", "torch"]
WEIGHTS_FORMATS: tuple[str, ...] = ("auto", "safetensors", "torch")

# Official hub builders (dinov2/hub/backbones.py): arch -> (builder name, ffn_layer the builder uses).
_HUB_BUILDERS = {
    "vit_small": ("dinov2_vits14", "mlp"),
    "vit_base": ("dinov2_vitb14", "mlp"),
    "vit_large": ("dinov2_vitl14", "mlp"),
    "vit_giant2": ("dinov2_vitg14", "swiglufused"),
}
# timm dinov2 model names per official arch and the sizes those builders fix.
_TIMM_MODELS = {
    "vit_small": ("vit_small_patch14_dinov2", "mlp"),
    "vit_base": ("vit_base_patch14_dinov2", "mlp"),
    "vit_large": ("vit_large_patch14_dinov2", "mlp"),
    "vit_giant2": ("vit_giant_patch14_dinov2", "swiglu"),
}
_CHUNKED_BACKBONE_KEY = re.compile(r"\.backbone\.blocks\.\d+\.(\d+)\.")
_LINEAR_WEIGHT = re.compile(r"^(blocks\.\d+\.(?:attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2|mlp\.w12|mlp\.w3))\.weight$")


class ExportError(ValueError):
    """The source cannot be exported in the requested format; the message says why and what is allowed."""


# ------------------------------------------------------------------ layout
@dataclass(frozen=True)
class BackboneLayout:
    """What every converter needs to know about a backbone, read from the model (not from file names)."""

    arch: str
    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    in_chans: int
    img_size: int
    ffn_layer: str  # mlp | swiglu (packed w12/w3) | identity
    num_register_tokens: int
    interpolate_antialias: bool
    interpolate_offset: float

    @property
    def official_interpolation(self) -> bool:
        """True when the interpolation family is the one the official builders use for this register count."""
        if self.num_register_tokens == 0:
            return not self.interpolate_antialias and self.interpolate_offset == 0.1
        return self.num_register_tokens == 4 and self.interpolate_antialias and self.interpolate_offset == 0.0


def backbone_layout(backbone: DinoVisionTransformer) -> BackboneLayout:
    """The layout of a backbone built by ``build_backbone`` (or loaded with ``load_backbone``)."""
    spec = backbone_spec(backbone)
    kwargs = spec["kwargs"]
    ffn_layer = kwargs.get("ffn_layer", "mlp")
    return BackboneLayout(
        arch=spec["arch"],
        embed_dim=backbone.embed_dim,
        depth=backbone.n_blocks,
        num_heads=backbone.num_heads,
        patch_size=backbone.patch_size,
        in_chans=backbone.patch_embed.proj.in_channels,
        img_size=backbone.patch_embed.img_size,
        ffn_layer="swiglu" if ffn_layer in ("swiglu", "swiglufused") else ffn_layer,
        num_register_tokens=backbone.num_register_tokens,
        interpolate_antialias=backbone.interpolate_antialias,
        interpolate_offset=float(backbone.interpolate_offset),
    )


def complete_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Hub-format state with LayerScale (``gamma = 1`` where absent) and every Linear bias (zeros where absent)."""
    out = dict(state)
    dim = out["cls_token"].shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in out if k.startswith("blocks."))
    for index in range(depth):
        for scale in ("ls1", "ls2"):
            out.setdefault(f"blocks.{index}.{scale}.gamma", torch.ones(dim, dtype=out["cls_token"].dtype))
    for key in list(out):
        match = _LINEAR_WEIGHT.match(key)
        if match:
            weight = out[key]
            out.setdefault(f"{match.group(1)}.bias", torch.zeros(weight.shape[0], dtype=weight.dtype))
    return out


def _check_img_size(img_size: int, patch_size: int) -> None:
    if img_size <= 0 or img_size % patch_size:
        raise ExportError(f"img_size={img_size} must be a positive multiple of the patch size {patch_size}")


def resized_state_dict(backbone: DinoVisionTransformer, img_size: int) -> dict[str, Tensor]:
    """Completed hub-format state with ``pos_embed`` on the ``img_size`` grid, resized the way the model itself
    resizes at run time (so the export at ``img_size`` equals the model at ``img_size``)."""
    _check_img_size(img_size, backbone.patch_size)
    state = complete_state_dict(to_official_state_dict(backbone))
    grid = img_size // backbone.patch_size
    state["pos_embed"] = interpolate_pos_embed(state["pos_embed"], grid, grid, offset=backbone.interpolate_offset,
                                               antialias=backbone.interpolate_antialias).contiguous()
    return state


# -------------------------------------------------------------------- hub
def hub_builder(layout: BackboneLayout) -> str | None:
    """Name of the official hub builder that constructs this layout (``dinov2_vits14_reg`` …), or None."""
    if layout.arch not in _HUB_BUILDERS or layout.patch_size != 14 or layout.in_chans != 3:
        return None
    name, ffn_layer = _HUB_BUILDERS[layout.arch]
    if layout.ffn_layer != ("swiglu" if ffn_layer == "swiglufused" else ffn_layer):
        return None
    if not layout.official_interpolation:
        return None
    return name + ("_reg" if layout.num_register_tokens else "")


def official_kwargs(layout: BackboneLayout, img_size: int) -> dict[str, Any]:
    """Keyword arguments of the official ``DinoVisionTransformer`` that rebuild the completed layout.

    Register and interpolation arguments are listed only when they differ from the defaults, so the call
    also works with official releases that predate them.
    """
    kwargs: dict[str, Any] = {
        "img_size": img_size, "patch_size": layout.patch_size, "in_chans": layout.in_chans,
        "embed_dim": layout.embed_dim, "depth": layout.depth, "num_heads": layout.num_heads, "mlp_ratio": 4,
        "init_values": 1.0, "block_chunks": 0,
        "ffn_layer": {"swiglu": "swiglufused"}.get(layout.ffn_layer, layout.ffn_layer),
    }
    if layout.num_register_tokens:
        kwargs["num_register_tokens"] = layout.num_register_tokens
    if layout.interpolate_antialias:
        kwargs["interpolate_antialias"] = True
    if layout.interpolate_offset != 0.1:
        kwargs["interpolate_offset"] = layout.interpolate_offset
    return kwargs


def hub_load_call(layout: BackboneLayout, weights: str, img_size: int) -> str:
    """The official call that builds the model for ``weights`` and loads it (strict, the default)."""
    builder = hub_builder(layout)
    load = f"model.load_state_dict(torch.load({weights!r}, map_location='cpu', weights_only=True))"
    if builder:
        size = "" if img_size == HUB_IMG_SIZE else f", img_size={img_size}"
        return f"model = torch.hub.load('facebookresearch/dinov2', {builder!r}, pretrained=False{size}); {load}"
    arguments = ", ".join(f"{k}={v!r}" for k, v in official_kwargs(layout, img_size).items())
    return f"model = dinov2.models.vision_transformer.DinoVisionTransformer({arguments}); {load}"


def export_hub(backbone: DinoVisionTransformer, out_dir: str | os.PathLike, img_size: int | None = None) -> dict:
    """Write ``backbone.pth`` (official hub layout, ``pos_embed`` on the ``img_size`` grid; default 518 px for
    patch 14, else the training size), ``model.json`` (our spec, so ``load_backbone`` reads it too) and
    ``export_info.json``. Returns the info dict."""
    layout = backbone_layout(backbone)
    if img_size is None:
        img_size = HUB_IMG_SIZE if layout.patch_size == 14 else layout.img_size
    state = resized_state_dict(backbone, img_size)
    spec = backbone_spec(backbone)
    spec["kwargs"] = {**spec["kwargs"], "img_size": img_size, "block_chunks": 0, "init_values": 1.0,
                      "qkv_bias": True, "proj_bias": True, "ffn_bias": True, "drop_path_rate": 0.0}
    builder = hub_builder(layout)
    weights = os.path.join(os.fspath(out_dir), HUB_WEIGHTS_FILE)
    if builder is None:
        note = ("no official hub builder has this architecture, patch size, FFN or register/interpolation setting: "
                "build the official DinoVisionTransformer with official_kwargs")
    elif img_size != HUB_IMG_SIZE:
        note = f"the official hub builder with img_size={img_size} (default {HUB_IMG_SIZE}) constructs this model"
    else:
        note = "the official hub builder constructs this model unchanged"
    info = {
        "format": "hub", "img_size": img_size, "official_builder": builder,
        "official_kwargs": official_kwargs(layout, img_size),
        "load": hub_load_call(layout, weights, img_size), "note": note,
    }
    atomic_torch_save(state, weights)
    atomic_write_json(os.path.join(os.fspath(out_dir), SPEC_FILE), spec)
    return info


# ------------------------------------------------------------------- timm
def _timm_swiglu_ratio(dim: int) -> float:
    """``mlp_ratio`` for which timm's packed SwiGLU (``int(dim * ratio)`` = 2 x hidden) matches our hidden width."""
    packed = 2 * swiglu_hidden_features(4 * dim)
    ratio = packed / dim
    return ratio if int(dim * ratio) == packed else (packed + 0.5) / dim


def timm_model_args(layout: BackboneLayout, img_size: int) -> tuple[str, dict[str, Any]]:
    """timm model name and ``create_model`` keyword arguments (JSON values) that build this layout."""
    if layout.ffn_layer not in ("mlp", "swiglu"):
        raise ExportError(f"ffn_layer={layout.ffn_layer!r} has no timm equivalent; allowed for timm: ['mlp', "
                          "'swiglu', 'swiglufused']")
    if layout.arch in _TIMM_MODELS and _TIMM_MODELS[layout.arch][1] == layout.ffn_layer:
        name, reference = _TIMM_MODELS[layout.arch][0], layout.arch
    else:  # same family, sizes overridden below
        name = "vit_small_patch14_dinov2" if layout.ffn_layer == "mlp" else "vit_giant_patch14_dinov2"
        reference = "vit_small" if layout.ffn_layer == "mlp" else "vit_giant2"
    kwargs: dict[str, Any] = {"img_size": img_size, "num_classes": 0}
    if layout.patch_size != 14:
        kwargs["patch_size"] = layout.patch_size
    if layout.in_chans != 3:
        kwargs["in_chans"] = layout.in_chans
    dims = arch_dims(reference)
    for key, value in (("embed_dim", layout.embed_dim), ("depth", layout.depth), ("num_heads", layout.num_heads)):
        if dims[key] != value:
            kwargs[key] = value
    if layout.ffn_layer == "swiglu" and layout.embed_dim != dims["embed_dim"]:
        kwargs["mlp_ratio"] = _timm_swiglu_ratio(layout.embed_dim)
    if layout.num_register_tokens:
        name = name.replace("_patch14_dinov2", "_patch14_reg4_dinov2")
        if layout.num_register_tokens != 4:
            kwargs["reg_tokens"] = layout.num_register_tokens
    return name, kwargs


def to_timm_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Completed hub-format state → timm ``VisionTransformer`` keys (no mask token; packed SwiGLU as fc1/fc2).

    Register models become timm's ``no_embed_class`` layout: the cls slot of ``pos_embed`` is added to
    ``cls_token`` (what our model adds at run time) and ``pos_embed`` keeps the patch slots only.
    """
    out: dict[str, Tensor] = {}
    state = dict(state)
    state.pop("mask_token", None)
    if "register_tokens" in state:
        out["reg_token"] = state.pop("register_tokens")
        pos_embed = state.pop("pos_embed")
        out["cls_token"] = state.pop("cls_token") + pos_embed[:, :1]
        out["pos_embed"] = pos_embed[:, 1:].contiguous()
    for key, value in state.items():
        out[key.replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2.")] = value
    return out


def timm_load_call(name: str, kwargs: Mapping[str, Any], weights: str) -> str:
    arguments = "".join(f", {k}={v!r}" for k, v in kwargs.items())
    return f"model = timm.create_model({name!r}, pretrained=False, checkpoint_path={weights!r}{arguments})"


def export_timm(backbone: DinoVisionTransformer, out_dir: str | os.PathLike, img_size: int | None = None,
                weights_format: WeightsFormat = "auto") -> dict:
    """Write timm weights (``model.safetensors`` or ``model.pth``) and ``export_info.json`` with the
    ``timm.create_model`` call. ``img_size`` defaults to the training size."""
    layout = backbone_layout(backbone)
    img_size = img_size or layout.img_size
    name, kwargs = timm_model_args(layout, img_size)
    state = to_timm_state_dict(resized_state_dict(backbone, img_size))
    weights = _write_weights(state, out_dir, "model", weights_format, metadata={"format": "pt"})
    return {"format": "timm", "img_size": img_size, "weights": os.path.basename(weights), "timm_model": name,
            "timm_kwargs": kwargs,
            "load": timm_load_call(name, kwargs, weights),
            "note": "exact at img_size; other sizes need dynamic_img_size=True and use timm's own pos-embed resize"}


# --------------------------------------------------------- transformers
def hf_config(layout: BackboneLayout, img_size: int) -> dict[str, Any]:
    """``config.json`` of ``Dinov2Model`` (or ``Dinov2WithRegistersModel`` when the backbone has registers)."""
    if layout.ffn_layer not in ("mlp", "swiglu"):
        raise ExportError(f"ffn_layer={layout.ffn_layer!r} has no transformers equivalent; allowed for hf: "
                          "['mlp', 'swiglu', 'swiglufused']")
    registers = layout.num_register_tokens > 0
    config: dict[str, Any] = {
        "architectures": ["Dinov2WithRegistersModel" if registers else "Dinov2Model"],
        "model_type": "dinov2_with_registers" if registers else "dinov2",
        "hidden_size": layout.embed_dim, "num_hidden_layers": layout.depth,
        "num_attention_heads": layout.num_heads, "mlp_ratio": 4, "hidden_act": "gelu",
        "layer_norm_eps": LAYER_NORM_EPS, "image_size": img_size, "patch_size": layout.patch_size,
        "num_channels": layout.in_chans, "qkv_bias": True, "layerscale_value": 1.0,
        "use_swiglu_ffn": layout.ffn_layer == "swiglu", "drop_path_rate": 0.0, "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02, "torch_dtype": "float32",
    }
    if registers:
        config["num_register_tokens"] = layout.num_register_tokens
    else:
        config["use_mask_token"] = True
    return config


_HF_EMBEDDINGS = {
    "cls_token": "embeddings.cls_token",
    "mask_token": "embeddings.mask_token",
    "pos_embed": "embeddings.position_embeddings",
    "register_tokens": "embeddings.register_tokens",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
}
_HF_BLOCK = {
    "norm1": "norm1", "norm2": "norm2", "attn.proj": "attention.output.dense",
    "ls1.gamma": "layer_scale1.lambda1", "ls2.gamma": "layer_scale2.lambda1",
    "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2", "mlp.w12": "mlp.weights_in", "mlp.w3": "mlp.weights_out",
}
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+?)(\.weight|\.bias)?$")


def to_hf_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Completed hub-format state → ``Dinov2Model`` keys, in the layout of the DINOv2 checkpoints on the HF Hub
    (``attention.attention.{query,key,value}``, packed SwiGLU as ``mlp.weights_in``/``weights_out``)."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key in _HF_EMBEDDINGS:
            out[_HF_EMBEDDINGS[key]] = value
            continue
        match = _BLOCK_KEY.match(key)
        if not match or (match.group(2) not in _HF_BLOCK and match.group(2) != "attn.qkv"):
            raise ExportError(f"no transformers key for {key!r}")
        index, name, suffix = match.group(1), match.group(2), match.group(3) or ""
        prefix = f"encoder.layer.{index}."
        if name == "attn.qkv":  # rows are [q; k; v], each head-major, as transformers' separate projections
            for part, chunk in zip(("query", "key", "value"), value.chunk(3, dim=0)):
                out[f"{prefix}attention.attention.{part}{suffix}"] = chunk.contiguous()
        else:
            out[f"{prefix}{_HF_BLOCK[name]}{suffix}"] = value
    return out


def hf_load_call(registers: bool, directory: str) -> str:
    cls = "Dinov2WithRegistersModel" if registers else "Dinov2Model"
    return f"model = transformers.{cls}.from_pretrained({directory!r})"


def export_hf(backbone: DinoVisionTransformer, out_dir: str | os.PathLike, img_size: int | None = None,
              weights_format: WeightsFormat = "auto") -> dict:
    """Write a ``save_pretrained``-style directory: ``config.json`` + ``model.safetensors`` (or
    ``pytorch_model.bin``) and ``export_info.json``. ``img_size`` defaults to the training size."""
    layout = backbone_layout(backbone)
    img_size = img_size or layout.img_size
    config = hf_config(layout, img_size)
    state = to_hf_state_dict(resized_state_dict(backbone, img_size))
    use_safetensors = _use_safetensors(weights_format)
    base = "model" if use_safetensors else "pytorch_model"
    weights = _write_weights(state, out_dir, base, "safetensors" if use_safetensors else "torch",
                             metadata={"format": "pt"}, torch_suffix=".bin")
    atomic_write_json(os.path.join(os.fspath(out_dir), "config.json"), config)
    return {"format": "hf", "img_size": img_size, "weights": os.path.basename(weights),
            "load": hf_load_call(layout.num_register_tokens > 0, os.fspath(out_dir)),
            "note": "exact at img_size; at other sizes transformers resizes pos embeddings with its own rule"}


# ---------------------------------------------------------------- weights
def _use_safetensors(weights_format: str) -> bool:
    if weights_format not in WEIGHTS_FORMATS:
        raise ExportError(f"weights_format={weights_format!r}; allowed: {list(WEIGHTS_FORMATS)}")
    available = importlib.util.find_spec("safetensors") is not None
    if weights_format == "safetensors" and not available:
        raise ExportError("weights_format='safetensors' needs the safetensors package; allowed without it: "
                          "['auto', 'torch']")
    return weights_format == "safetensors" or (weights_format == "auto" and available)


def _write_weights(state: Mapping[str, Tensor], out_dir: str | os.PathLike, base: str, weights_format: str,
                   metadata: dict[str, str] | None = None, torch_suffix: str = ".pth") -> str:
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    if _use_safetensors(weights_format):
        from safetensors.torch import save  # optional: installed with timm / transformers

        path = os.path.join(os.fspath(out_dir), base + ".safetensors")
        atomic_write_bytes(path, save(tensors, metadata=metadata))
    else:
        path = os.path.join(os.fspath(out_dir), base + torch_suffix)
        atomic_torch_save(tensors, path)
    return path


def _read_weights(path: str | os.PathLike) -> dict[str, Tensor]:
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return safe_torch_load(path)


# ---------------------------------------------------------- sources
@dataclass
class ExportSource:
    """What ``SRC`` holds: the published backbone and, for a training output, the full training state."""

    backbone: DinoVisionTransformer
    origin: str
    training_state: dict[str, Tensor] | None = None  # flat "<side>.<module>.<param>" (+ loss centers)
    training_info: dict[str, Any] = field(default_factory=dict)


def _read_dcp_model_state(checkpoint: Path) -> dict[str, Tensor]:
    """Every tensor under ``model.`` of a DCP checkpoint, unsharded, in this (single) process, read without
    unrestricted unpickling (:func:`~dinov2_core.models.checkpoint_io.safe_dcp_load`)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = read_dcp_metadata(checkpoint)
    state = {key[len("model."):]: torch.empty(entry.size, dtype=entry.properties.dtype)
             for key, entry in metadata.state_dict_metadata.items()
             if key.startswith("model.") and isinstance(entry, TensorStorageMetadata)}
    if not state:
        raise ExportError(f"{checkpoint} holds no model tensors (keys {sorted(metadata.state_dict_metadata)[:5]})")
    with warnings.catch_warnings():  # a single-process read is the intent, not a mistake to warn about
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        safe_dcp_load({"model": state}, checkpoint, allow_partial_load=True)
    return state


def _training_checkpoint(path: Path) -> Path | None:
    from dinov2_core.train.checkpointing import COMPLETE_MARKER, CheckpointManager  # lazy: not needed at import

    if (path / ".metadata").exists():
        if not (path / COMPLETE_MARKER).exists():
            raise ExportError(f"{path} is an incomplete DCP checkpoint (no {COMPLETE_MARKER} marker: the job was "
                              "stopped while saving); pass a complete one or the training output directory")
        return path
    if (path / "checkpoints").is_dir():
        return CheckpointManager(path, keep_last=1).latest()
    return None


def _side_backbone(state: Mapping[str, Tensor], side: str) -> dict[str, Tensor]:
    prefix = f"{side}.backbone."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _source_from_checkpoint(checkpoint: Path) -> ExportSource:
    from dinov2_core.train.config import load_train_config
    from dinov2_core.train.exporting import head_config
    from dinov2_core.train.meta_arch import backbone_kwargs
    from dinov2_core.utils.config import to_dict

    output_dir = checkpoint.parent.parent
    config_file = output_dir / "config.yaml"
    if not config_file.exists():
        raise ExportError(f"{checkpoint} is a DCP checkpoint but {config_file} (the run's resolved config) is missing")
    cfg = load_train_config(str(config_file))
    state = _read_dcp_model_state(checkpoint)
    sides = sorted({k.split(".", 1)[0] for k in state if ".backbone." in k})
    exported = "model_ema" if "model_ema" in sides else "teacher"  # same rule as SSLMetaArch.exported_backbone
    spec = {"arch": cfg.student.arch, "kwargs": {**backbone_kwargs(cfg, drop_path=False), "block_chunks": 0}}
    # When distilling, the frozen teacher is another model (its export's spec is not in this run's config):
    # its spec is read from its tensor shapes. Every other side is a copy of the configured student.
    backbones = {side: infer_backbone_spec(_side_backbone(state, side)) if cfg.phase == "distill" and side == "teacher"
                 else spec for side in sides}
    backbone = build_backbone_from_spec(spec)
    load_state_dict_strict(backbone, _side_backbone(state, exported))
    info = {"iteration": int(checkpoint.name) if checkpoint.name.isdigit() else None, "checkpoint": str(checkpoint),
            "phase": cfg.phase, "exported_side": exported, "backbone": spec, "backbones": backbones,
            "heads": head_config(cfg), "config": to_dict(cfg)}
    return ExportSource(backbone.eval(), str(checkpoint), state, info)


def read_export_source(src: str | os.PathLike) -> ExportSource:
    """``src``: an export directory (``backbone.pth`` + ``model.json``), a training output directory (its newest
    complete DCP checkpoint; else its ``export/``), a DCP checkpoint directory, or a hub ``.pth`` file."""
    path = Path(src)
    if not path.exists():
        raise ExportError(f"SRC {os.fspath(src)!r} does not exist")
    if path.is_dir() and not (path / SPEC_FILE).exists():
        checkpoint = _training_checkpoint(path)
        if checkpoint is not None:
            return _source_from_checkpoint(checkpoint)
        if (path / "export" / SPEC_FILE).exists():
            path = path / "export"
        else:
            raise ExportError(f"SRC {os.fspath(src)!r} is neither an export directory (backbone.pth + model.json), "
                              "a training output directory (checkpoints/ with a complete DCP checkpoint, or export/), "
                              "a DCP checkpoint directory nor a .pth file")
    return ExportSource(load_backbone(str(path)), str(path))


# ---------------------------------------------------- full training state
def export_full(source: ExportSource, out_dir: str | os.PathLike, weights_format: WeightsFormat = "auto") -> dict:
    """Write ``training_state.safetensors`` (or ``.pth``): every model tensor of the checkpoint (student, teacher,
    ``model_ema`` when distilling, DINO/iBOT heads, loss centers; backbones in hub key naming), and
    ``training_state.json`` (backbone spec, head config, iteration, resolved config, tensor index)."""
    if source.training_state is None:
        raise ExportError(f"format 'full' needs the student, which only a training output directory or DCP "
                          f"checkpoint holds; {source.origin} is an export or hub file (teacher backbone only). "
                          "Allowed formats for it: ['hub', 'timm', 'hf']")
    state = {_CHUNKED_BACKBONE_KEY.sub(r".backbone.blocks.\1.", k): v for k, v in source.training_state.items()}
    weights = _write_weights(state, out_dir, "training_state", weights_format, metadata={"format": "pt"})
    modules: dict[str, list[str]] = {}
    for key in state:
        parts = key.split(".")
        if len(parts) > 2 and parts[1] in ("backbone", "dino_head", "ibot_head"):
            modules.setdefault(parts[0], [])
            if parts[1] not in modules[parts[0]]:
                modules[parts[0]].append(parts[1])
    spec = {"format": TRAINING_STATE_FORMAT, "version": 1, "weights": os.path.basename(weights),
            "modules": modules, "other_tensors": sorted(k for k in state if k.split(".")[0] not in modules),
            **source.training_info}
    atomic_write_json(os.path.join(os.fspath(out_dir), TRAINING_STATE_SPEC), spec)
    return {"format": "full", "weights": os.path.basename(weights), "iteration": source.training_info.get("iteration"),
            "load": f"state = dinov2_core.models.export_formats.load_training_state({os.fspath(out_dir)!r})",
            "note": "model weights only (no optimizer state); TrainingState.modules(side) rebuilds "
                    "student/teacher backbone + heads"}


@dataclass
class TrainingState:
    """A ``full`` export read back: the spec (``backbones`` holds each side's backbone spec) and one state dict
    per ``<side>.<module>``."""

    spec: dict[str, Any]
    tensors: dict[str, Tensor]

    @property
    def sides(self) -> list[str]:
        return sorted(self.spec["modules"])

    def state_dict(self, side: str, module: str) -> dict[str, Tensor]:
        if module not in self.spec["modules"].get(side, []):
            raise KeyError(f"no {side}.{module}; allowed: "
                           f"{[f'{s}.{m}' for s, ms in sorted(self.spec['modules'].items()) for m in ms]}")
        prefix = f"{side}.{module}."
        return {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}

    def modules(self, side: str) -> nn.ModuleDict:
        """The backbone and heads of ``side`` (``student``, ``teacher`` or ``model_ema``), loaded strictly."""
        backbone = build_backbone_from_spec(self.spec["backbones"][side])
        load_state_dict_strict(backbone, self.state_dict(side, "backbone"))
        result = nn.ModuleDict({"backbone": backbone})
        for name in self.spec["modules"][side]:
            if name == "backbone":
                continue
            head_cfg = self.spec["heads"]["dino" if name == "dino_head" else "ibot"]
            head = DINOHead(backbone.embed_dim, head_cfg["head_n_prototypes"], nlayers=head_cfg["head_nlayers"],
                            hidden_dim=head_cfg["head_hidden_dim"], bottleneck_dim=head_cfg["head_bottleneck_dim"])
            load_state_dict_strict(head, self.state_dict(side, name))
            result[name] = head
        return result


def load_training_state(directory: str | os.PathLike) -> TrainingState:
    """Read a ``full`` export (``training_state.json`` + its weights file)."""
    spec_path = Path(directory) / TRAINING_STATE_SPEC
    if not spec_path.exists():
        raise FileNotFoundError(f"{spec_path} not found: not a 'full' export directory")
    spec = json.loads(spec_path.read_text())
    if spec.get("format") != TRAINING_STATE_FORMAT:
        raise ExportError(f"{spec_path}: format {spec.get('format')!r}; allowed: [{TRAINING_STATE_FORMAT!r}]")
    return TrainingState(spec, _read_weights(Path(directory) / spec["weights"]))


# ------------------------------------------------------------- driver
def export(src: str | os.PathLike | ExportSource, out_dir: str | os.PathLike,
           formats: list[str] | tuple[str, ...] = FORMATS, img_size: int | None = None,
           weights_format: WeightsFormat = "auto", overwrite: bool = False) -> dict:
    """Export ``src`` (a path for :func:`read_export_source`, or its result) to ``<out_dir>/<format>/`` for each
    of ``formats``; returns ``{format: info}``.

    ``img_size`` applies to every backbone format (default: 518 for hub with patch 14, else the training size).
    Each directory is written under a temporary name and renamed into place when complete; an existing one is
    replaced only with ``overwrite=True``.
    """
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ExportError(f"formats {unknown or list(formats)}: allowed: {list(FORMATS)}")
    _use_safetensors(weights_format)  # reject a bad value before any work
    out_root = Path(out_dir)
    for name in formats:
        if (out_root / name).exists() and not overwrite:
            raise ExportError(f"{out_root / name} already exists; pass overwrite=True (--overwrite) to replace it")
    source = src if isinstance(src, ExportSource) else read_export_source(src)
    writers = {
        "hub": lambda d: export_hub(source.backbone, d, img_size),
        "timm": lambda d: export_timm(source.backbone, d, img_size, weights_format),
        "hf": lambda d: export_hf(source.backbone, d, img_size, weights_format),
        "full": lambda d: export_full(source, d, weights_format),
    }
    results = {}
    for name in formats:
        tmp = out_root / f".{name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            info = writers[name](tmp)
            final = out_root / name
            # the load call was written for the temporary directory: point it at the published one
            info = {**info, "load": info["load"].replace(os.fspath(tmp), os.fspath(final)), "source": source.origin}
            atomic_write_json(tmp / INFO_FILE, info)
            if final.exists():
                old = out_root / f".{name}.old-{os.getpid()}"
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        results[name] = info
    return results
