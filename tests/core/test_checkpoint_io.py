"""Strict loading, key conversion, spec inference and export of backbone checkpoints."""

from __future__ import annotations

import json
import os

import pytest
import torch

from dinov2_core.models import backbone_spec, build_backbone
from dinov2_core.models.checkpoint_io import (
    CheckpointMismatchError,
    chunk_state_dict,
    export_backbone,
    export_backbone_dir,
    extract_backbone_state_dict,
    infer_backbone_spec,
    load_backbone,
    load_state_dict_strict,
    to_official_state_dict,
    unchunk_state_dict,
)

HUB = {"patch_size": 14, "img_size": 518, "init_values": 1.0, "block_chunks": 0}


def tiny(**kwargs):
    torch.manual_seed(0)
    return build_backbone("vit_test", patch_size=8, img_size=32, **kwargs).eval()


def test_chunk_key_conversion_roundtrip():
    with torch.device("meta"):
        chunked = build_backbone("vit_large", **{**HUB, "block_chunks": 4}).state_dict()
    plain = unchunk_state_dict(chunked)
    assert "blocks.23.mlp.fc2.weight" in plain and "blocks.3.23.mlp.fc2.weight" in chunked
    assert not any(k.count(".") > 3 and k.split(".")[2].isdigit() for k in plain)
    assert list(chunk_state_dict(plain, depth=24, block_chunks=4)) == list(chunked)
    assert unchunk_state_dict(plain) == plain  # idempotent on plain keys
    assert chunk_state_dict(plain, depth=24, block_chunks=0) == plain


def test_chunked_to_official_to_fresh_model_is_bit_exact(tmp_path):
    source = tiny(block_chunks=2, num_register_tokens=2, init_values=1e-5, ffn_layer="swiglufused")
    torch.manual_seed(1)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    official = to_official_state_dict(source)
    assert "blocks.3.mlp.w12.weight" in official and not any(k.startswith("blocks.1.3") for k in official)
    path = tmp_path / "backbone.pth"
    export_backbone(source, path)
    assert sorted(os.listdir(tmp_path)) == ["backbone.pth"]  # no temp leftovers
    fresh = load_backbone(path, spec={"arch": "vit_test", "kwargs": {**backbone_spec(source)["kwargs"], "block_chunks": 0}})
    x = torch.randn(2, 3, 32, 40)
    with torch.no_grad():
        a, b = source.forward_features(x), fresh.forward_features(x)
    for key in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens"):
        assert torch.equal(a[key], b[key])


def test_export_dir_and_load_backbone(tmp_path):
    source = tiny(num_register_tokens=1, block_chunks=4, interpolate_antialias=True, interpolate_offset=0.0)
    export_backbone_dir(source, tmp_path / "export")
    spec = json.loads((tmp_path / "export" / "model.json").read_text())
    assert spec["arch"] == "vit_test" and spec["kwargs"]["block_chunks"] == 0
    loaded = load_backbone(tmp_path / "export")
    assert not loaded.training and not loaded.chunked_blocks
    x = torch.randn(1, 3, 24, 16)
    with torch.no_grad():
        assert torch.equal(source(x), loaded(x))
    with pytest.raises(FileNotFoundError, match="without model.json"):
        load_backbone(tmp_path)
    # the same file loads into a chunked model when the caller asks for one
    chunked = load_backbone(tmp_path / "export", spec=backbone_spec(source))
    assert chunked.chunked_blocks
    with torch.no_grad():
        assert torch.equal(source(x), chunked(x))


def test_mismatch_errors_name_the_keys():
    model = tiny()
    state = to_official_state_dict(model)
    state.pop("blocks.1.attn.qkv.bias")
    state["blocks.1.attn.q_bias"] = torch.zeros(64)
    state["pos_embed"] = torch.zeros(1, 50, 64)
    with pytest.raises(CheckpointMismatchError) as info:
        load_state_dict_strict(model, state)
    message = str(info.value)
    assert "1 missing keys: [blocks.1.attn.qkv.bias]" in message
    assert "1 unexpected keys: [blocks.1.attn.q_bias]" in message
    assert "pos_embed: checkpoint (1, 50, 64) vs model (1, 17, 64)" in message
    assert info.value.missing == ["blocks.1.attn.qkv.bias"]
    with pytest.raises(CheckpointMismatchError, match="register_tokens"):
        load_state_dict_strict(tiny(num_register_tokens=4), to_official_state_dict(model))


def test_teacher_snapshot_extraction(tmp_path):
    model = tiny(block_chunks=2)
    backbone = {f"backbone.{k}": v for k, v in model.state_dict().items()}
    heads = {"dino_head.mlp.0.weight": torch.zeros(2, 2), "ibot_head.last_layer.weight_g": torch.ones(3, 1)}
    snapshot = {"teacher": {f"module.{k}": v for k, v in {**backbone, **heads}.items()}}
    state = extract_backbone_state_dict(snapshot)
    assert set(state) == set(to_official_state_dict(model))
    torch.save(snapshot, tmp_path / "teacher_checkpoint.pth")
    loaded = load_backbone(tmp_path / "teacher_checkpoint.pth", spec=backbone_spec(tiny()))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


@pytest.mark.parametrize(
    "arch,kwargs,expected",
    [
        ("vit_small", {}, {"ffn_layer": "mlp", "num_register_tokens": 0}),
        ("vit_small", {"num_register_tokens": 4, "interpolate_antialias": True, "interpolate_offset": 0.0},
         {"num_register_tokens": 4, "interpolate_antialias": True, "interpolate_offset": 0.0}),
        ("vit_large", {"block_chunks": 4}, {"block_chunks": 0}),
        ("vit_giant2", {"ffn_layer": "swiglufused"}, {"ffn_layer": "swiglufused"}),
    ],
)
def test_infer_spec_from_hub_shapes(arch, kwargs, expected):
    with torch.device("meta"):
        state = build_backbone(arch, **{**HUB, **kwargs}).state_dict()
    spec = infer_backbone_spec(state)
    assert spec["arch"] == arch
    assert {k: spec["kwargs"][k] for k in expected} == expected
    assert spec["kwargs"]["patch_size"] == 14 and spec["kwargs"]["img_size"] == 518
    assert spec["kwargs"]["init_values"] == 1.0
    with torch.device("meta"):
        rebuilt = build_backbone(spec["arch"], **spec["kwargs"])
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in unchunk_state_dict(state).items()}


def test_infer_spec_rejects_unknown_shapes():
    state = to_official_state_dict(tiny())
    with pytest.raises(ValueError, match="no arch with embed_dim=64 and depth=3"):
        infer_backbone_spec({k: v for k, v in state.items() if not k.startswith("blocks.3.")})
    with pytest.raises(ValueError, match="not a DINOv2 backbone"):
        infer_backbone_spec({"weight": torch.zeros(1)})


def test_hub_file_without_spec_loads_strictly(tmp_path):
    """A hub-format file of a vit_test register model: inferred spec, strict load, same outputs."""
    source = tiny(num_register_tokens=4, interpolate_antialias=True, interpolate_offset=0.0, init_values=1.0,
                  block_chunks=0)
    torch.save(to_official_state_dict(source), tmp_path / "dinov2_vittest_reg4_pretrain.pth")
    loaded = load_backbone(tmp_path / "dinov2_vittest_reg4_pretrain.pth")
    assert backbone_spec(loaded)["kwargs"]["interpolate_antialias"] is True
    x = torch.randn(1, 3, 48, 16)
    with torch.no_grad():
        assert torch.equal(source(x), loaded(x))


@pytest.mark.official
def test_official_hub_style_file_loads_strictly_both_ways(tmp_path):
    """A ViT-g-style hub file (packed SwiGLU w12/w3) saved by the official code loads with strict=True."""
    official = pytest.importorskip("dinov2.models.vision_transformer")
    from functools import partial

    from dinov2.layers import MemEffAttention, NestedTensorBlock

    torch.manual_seed(0)
    theirs = official.DinoVisionTransformer(
        embed_dim=64, depth=4, num_heads=2, mlp_ratio=4, ffn_layer="swiglufused", patch_size=8, img_size=32,
        init_values=1.0, block_chunks=0, block_fn=partial(NestedTensorBlock, attn_class=MemEffAttention),
    ).eval()
    torch.save(theirs.state_dict(), tmp_path / "hub.pth")
    ours = load_backbone(tmp_path / "hub.pth")
    assert backbone_spec(ours)["kwargs"]["ffn_layer"] == "swiglufused"
    theirs.load_state_dict(to_official_state_dict(ours), strict=True)
    x = torch.randn(2, 3, 32, 24)
    with torch.no_grad():
        assert (theirs(x) - ours(x)).abs().max() <= 1e-5
