"""Backbone structure, forward semantics and (with the official package) numerical parity."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from dinov2_core.models import (
    ARCH_NAMES,
    backbone_spec,
    build_backbone,
    build_backbone_from_spec,
)
from dinov2_core.models.layers import interpolate_pos_embed
from dinov2_core.models.layers.drop_path import add_residual_on_subset, drop_path
from dinov2_core.models.layers.patch_embed import nearest_valid_sizes

HUB = {"patch_size": 14, "img_size": 518, "init_values": 1.0, "block_chunks": 0}


def tiny(**kwargs):
    torch.manual_seed(0)
    return build_backbone("vit_test", patch_size=8, img_size=32, init_values=1e-1, **kwargs).eval()


# ------------------------------------------------------------------ structure
@pytest.mark.parametrize(
    "arch,kwargs,keys,params",
    [
        ("vit_small", {}, 175, 22_056_576),
        ("vit_base", {}, 175, 86_580_480),
        ("vit_large", {}, 343, 304_368_640),
        ("vit_giant2", {"ffn_layer": "swiglufused"}, 567, 1_136_480_768),
    ],
)
@pytest.mark.parametrize("registers", [0, 4])
def test_official_key_and_param_counts(arch, kwargs, keys, params, registers):
    with torch.device("meta"):
        model = build_backbone(arch, num_register_tokens=registers, **HUB, **kwargs)
    state = model.state_dict()
    assert len(state) == keys + (1 if registers else 0)
    dim = model.embed_dim
    assert sum(p.numel() for p in model.parameters()) == params + registers * dim
    assert not any(k.startswith("head") for k in state)
    if registers:
        assert tuple(state["register_tokens"].shape) == (1, registers, dim)


def test_giant_swiglu_shapes_and_chunked_keys():
    with torch.device("meta"):
        model = build_backbone("vit_giant2", ffn_layer="swiglufused", **{**HUB, "block_chunks": 4})
    state = model.state_dict()
    assert tuple(state["blocks.0.0.mlp.w12.weight"].shape) == (8192, 1536)
    assert tuple(state["blocks.0.0.mlp.w3.weight"].shape) == (1536, 4096)
    assert tuple(state["pos_embed"].shape) == (1, 1370, 1536)
    # chunk c holds global indices c*10 .. c*10+9
    assert "blocks.1.10.norm1.weight" in state and "blocks.3.39.ls2.gamma" in state
    assert "blocks.0.10.norm1.weight" not in state


def test_attributes_and_builders():
    for arch in ARCH_NAMES:
        with torch.device("meta"):
            model = build_backbone(arch, patch_size=14)
        assert model.patch_size == 14 and model.num_register_tokens == 0
        assert model.embed_dim % model.num_heads == 0 and model.n_blocks > 0
    with pytest.raises(ValueError, match="allowed: .*vit_giant2"):
        build_backbone("vit_huge")
    with pytest.raises(ValueError, match="ffn_layer.*allowed"):
        build_backbone("vit_test", ffn_layer="geglu")
    with pytest.raises(ValueError, match="unknown backbone kwargs .*embed_dim"):
        build_backbone("vit_test", embed_dim=10)
    with pytest.raises(ValueError, match="block_chunks=3"):
        build_backbone("vit_test", block_chunks=3)
    with pytest.raises(ValueError, match="attn_backend.*allowed"):
        build_backbone("vit_test", attn_backend="flash")


def test_spec_roundtrip_rebuilds_identical_architecture():
    model = build_backbone("vit_test", patch_size=8, img_size=32, num_register_tokens=2, ffn_layer="swiglu")
    spec = backbone_spec(model)
    assert spec == {"arch": "vit_test", "kwargs": {"patch_size": 8, "img_size": 32, "num_register_tokens": 2,
                                                   "ffn_layer": "swiglu"}}
    rebuilt = build_backbone_from_spec(spec)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="allowed: \\['arch', 'kwargs'\\]"):
        build_backbone_from_spec({"arch": "vit_test", "kwarg": {}})


def test_init_follows_recipe_and_works_from_meta():
    with torch.device("meta"):
        model = build_backbone("vit_tiny", patch_size=14, init_values=1e-5, num_register_tokens=4)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    assert torch.all(model.mask_token == 0)
    assert model.cls_token.abs().max() < 1e-4 and model.register_tokens.abs().max() < 1e-4
    # trunc_normal_(std=0.02) truncates at ±2 (absolute), as in the official init
    assert 0.018 < model.pos_embed.std() < 0.022 and model.pos_embed.abs().max() < 2
    block = model.blocks[0][0]  # default block_chunks=1 → one BlockChunk
    assert torch.all(block.attn.qkv.bias == 0) and 0.015 < block.attn.qkv.weight.std() < 0.025
    assert torch.all(block.ls1.gamma == 1e-5) and torch.all(block.norm1.weight == 1)
    assert torch.isfinite(model.patch_embed.proj.weight).all()


# --------------------------------------------------------------- pos-embed
def test_pos_embed_interpolation_families():
    torch.manual_seed(0)
    pos = torch.randn(1, 1 + 16 * 16, 8)
    assert interpolate_pos_embed(pos, 16, 16) is pos  # square, same grid → untouched
    offset = interpolate_pos_embed(pos, 7, 7, offset=0.1, antialias=False)
    sized = interpolate_pos_embed(pos, 7, 7, offset=0.0, antialias=True)
    assert offset.shape == sized.shape == (1, 50, 8)
    assert torch.equal(offset[:, 0], pos[:, 0]) and torch.equal(sized[:, 0], pos[:, 0])
    grid = pos[:, 1:].reshape(1, 16, 16, 8).permute(0, 3, 1, 2)
    expected_offset = F.interpolate(grid, scale_factor=(7.1 / 16, 7.1 / 16), mode="bicubic")
    expected_sized = F.interpolate(grid, size=(7, 7), mode="bicubic", antialias=True)
    assert torch.equal(offset[:, 1:], expected_offset.permute(0, 2, 3, 1).reshape(1, 49, 8))
    assert torch.equal(sized[:, 1:], expected_sized.permute(0, 2, 3, 1).reshape(1, 49, 8))
    assert (offset - sized).abs().max() > 0.1  # the two families really differ


def test_pos_embed_known_grids_and_dtype():
    constant = torch.full((1, 1 + 4 * 4, 3), 0.5, dtype=torch.bfloat16)
    for kwargs in ({"offset": 0.1}, {"offset": 0.0, "antialias": True}):
        out = interpolate_pos_embed(constant, 37, 19, **kwargs)
        assert out.dtype == torch.bfloat16 and out.shape == (1, 1 + 37 * 19, 3)
        assert torch.allclose(out.float(), torch.full_like(out.float(), 0.5))
    # a row-major ramp keeps its orientation on a non-square target grid
    ramp = torch.arange(16.0).reshape(4, 4)
    pos = torch.cat([torch.zeros(1, 1, 1), ramp.reshape(1, 16, 1)], dim=1)
    out = interpolate_pos_embed(pos, 8, 2, offset=0.0)[0, 1:, 0].reshape(8, 2)
    assert torch.all(out[1:, 0] >= out[:-1, 0]) and torch.all(out[:, 1] > out[:, 0])
    # same square grid but non-square image: interpolated, not skipped
    assert interpolate_pos_embed(pos, 2, 8).shape == (1, 17, 1)


def test_model_uses_its_family_for_interpolation():
    plain = tiny()
    reg = tiny(num_register_tokens=2, interpolate_antialias=True, interpolate_offset=0.0)
    reg.pos_embed.data.copy_(plain.pos_embed)
    tokens = torch.zeros(1, 1 + 18, 64, dtype=torch.bfloat16)
    a = plain.interpolate_pos_encoding(tokens, 48, 24)
    b = reg.interpolate_pos_encoding(tokens, 48, 24)
    assert a.shape == b.shape == (1, 1 + 6 * 3, 64) and not torch.allclose(a, b)
    assert a.dtype == torch.bfloat16  # resized embeddings follow the token dtype (official behaviour)
    assert plain.interpolate_pos_encoding(tokens, 32, 32) is plain.pos_embed


# ------------------------------------------------------------------ forward
def test_outputs_layout_with_registers_and_masks():
    model = tiny(num_register_tokens=3)
    x = torch.randn(2, 3, 32, 48)
    masks = torch.zeros(2, 4 * 6, dtype=torch.bool)
    masks[0, :5] = True
    with torch.no_grad():
        out = model.forward_features(x, masks=masks)
        plain = model.forward_features(x)
    assert out["x_norm_clstoken"].shape == (2, 64)
    assert out["x_norm_regtokens"].shape == (2, 3, 64)
    assert out["x_norm_patchtokens"].shape == (2, 24, 64)
    assert out["x_prenorm"].shape == (2, 1 + 3 + 24, 64) and out["masks"] is masks
    assert torch.equal(model.norm(out["x_prenorm"])[:, 0], out["x_norm_clstoken"])
    # masks change only the masked image; mask tokens replace patches before pos-embed
    assert torch.allclose(out["x_prenorm"][1], plain["x_prenorm"][1], atol=1e-6)
    assert not torch.allclose(out["x_prenorm"][0], plain["x_prenorm"][0])
    tokens = model.prepare_tokens_with_masks(x, masks)
    pos = model.interpolate_pos_encoding(tokens, 32, 48)
    assert torch.allclose(tokens[0, 4], model.mask_token[0] + pos[0, 1])  # first patch slot after 3 registers
    assert torch.equal(tokens[0, 1:4], model.register_tokens[0])  # registers carry no pos-embed
    with torch.no_grad():
        cls = model(x)
    assert torch.allclose(cls, plain["x_norm_clstoken"])
    assert isinstance(model(x, is_training=True), dict)


def test_non_multiple_image_size_error_names_sizes():
    model = tiny()
    with pytest.raises(ValueError, match=r"30x32 is not a multiple of the patch size 8.*height 30 -> 24 or 32"):
        model(torch.randn(1, 3, 30, 32))
    assert nearest_valid_sizes(225, 14) == [224, 238]
    with pytest.raises(ValueError, match="img_size|patch size"):
        build_backbone("vit_test", patch_size=14, img_size=225)


def test_multicrop_list_equals_per_crop_forward():
    model = tiny(num_register_tokens=1)
    crops = [torch.randn(3, 3, 32, 32), torch.randn(5, 3, 16, 16), torch.randn(2, 3, 24, 40)]
    masks = [torch.rand(3, 16) > 0.5, None, None]
    with torch.no_grad():
        outs = model.forward_features(crops, masks)
        singles = [model.forward_features(x, m) for x, m in zip(crops, masks)]
    assert len(outs) == 3
    for out, single in zip(outs, singles):
        for key in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm"):
            assert torch.allclose(out[key], single[key], atol=1e-5), key
    assert outs[0]["masks"] is masks[0]
    with pytest.raises(ValueError, match="2 crop batches but 1 masks"):
        model.forward_features(crops[:2], [None])


def test_multicrop_backward_matches_per_crop():
    model = tiny()
    crops = [torch.randn(2, 3, 32, 32), torch.randn(4, 3, 16, 16)]
    loss = sum(o["x_norm_clstoken"].pow(2).sum() for o in model.forward_features(crops, None))
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    model.zero_grad()
    loss2 = sum(model.forward_features(x)["x_norm_clstoken"].pow(2).sum() for x in crops)
    grads2 = torch.autograd.grad(loss2, list(model.parameters()), allow_unused=True)
    for g1, g2 in zip(grads, grads2):
        assert (g1 is None) == (g2 is None)
        if g1 is not None:
            assert torch.allclose(g1, g2, atol=1e-5)


def test_attention_backends_agree():
    x = torch.randn(2, 3, 32, 32)
    outs = []
    for backend in ("sdpa", "math", "xformers"):  # xformers falls back to SDPA without the package / on CPU
        with torch.no_grad():
            outs.append(tiny(attn_backend=backend).forward_features(x)["x_prenorm"])
    assert torch.allclose(outs[0], outs[1], atol=1e-5) and torch.allclose(outs[0], outs[2], atol=1e-6)


@pytest.mark.parametrize("chunks", [0, 2, 4])
def test_intermediate_layers(chunks):
    model = tiny(block_chunks=chunks, num_register_tokens=2)
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        last = model.get_intermediate_layers(x, n=1)
        both = model.get_intermediate_layers(x, n=[0, 3], reshape=True, return_class_token=True)
        raw = model.get_intermediate_layers(x, n=2, norm=False)
        full = model.forward_features(x)
    assert len(last) == 1 and torch.allclose(last[0], full["x_norm_patchtokens"], atol=1e-6)
    (p0, c0), (p3, c3) = both
    assert p0.shape == (2, 64, 4, 6) and c0.shape == (2, 64)
    assert torch.allclose(p3.flatten(2).transpose(1, 2), full["x_norm_patchtokens"], atol=1e-6)
    assert torch.allclose(c3, full["x_norm_clstoken"], atol=1e-6)
    assert torch.allclose(raw[1], full["x_prenorm"][:, 3:], atol=1e-6)
    with pytest.raises(ValueError, match="4 blocks"):
        model.get_intermediate_layers(x, n=[7])


def test_chunked_and_flat_models_compute_the_same():
    flat = tiny(block_chunks=0)
    chunked = tiny(block_chunks=2)
    from dinov2_core.models.checkpoint_io import load_state_dict_strict

    load_state_dict_strict(chunked, flat.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(flat(x), chunked(x))


# ------------------------------------------------------------ drop path
def test_drop_path_per_sample():
    torch.manual_seed(0)
    x = torch.ones(1000, 3, 2)
    out = drop_path(x, 0.1, training=True)
    kept = out[:, 0, 0] != 0
    assert torch.allclose(out[kept], torch.tensor(1 / 0.9)) and torch.all(out[~kept] == 0)
    assert 0.85 < kept.float().mean() < 0.95 and torch.equal(drop_path(x, 0.1, training=False), x)


def test_subset_residual_scales_and_counts():
    torch.manual_seed(0)
    xs = [torch.zeros(10, 2, 3), torch.zeros(4, 5, 3)]
    seen = []

    def branch(subsets):
        seen.extend(s.shape[0] for s in subsets)
        return [torch.ones_like(s) for s in subsets]

    out = add_residual_on_subset(xs, branch, rate=0.4)
    assert seen == [6, 2]  # int(b·(1−p)) per crop group
    assert torch.allclose(out[0].sum(dim=(1, 2)).unique(), torch.tensor([0.0, 6 * 10 / 6]))
    assert int((out[0][:, 0, 0] > 0).sum()) == 6 and int((out[1][:, 0, 0] > 0).sum()) == 2
    assert torch.allclose(out[1][out[1] > 0], torch.tensor(2.0))


def test_block_stochastic_depth_modes():
    x = torch.randn(8, 5, 64)
    high = tiny(drop_path_rate=0.4, drop_path_uniform=True)
    low = tiny(drop_path_rate=0.1, drop_path_uniform=True)
    block_high, block_low = high.blocks[0][0], low.blocks[0][0]
    calls = []
    block_high.attn.qkv.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    block_low.attn.qkv.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    block_high.train()(x)
    block_low.train()(x)
    assert calls == [int(8 * 0.6) * 5, 8 * 5]  # subset of 4 images (5 tokens each) vs all 8
    block_high.eval()
    with torch.no_grad():
        assert torch.equal(block_high(x), block_low.eval()(x))  # eval: no drop path, same weights (same seed)
    assert [b.sample_drop_ratio for b in tiny(drop_path_rate=0.3).blocks[0] if hasattr(b, "sample_drop_ratio")] == \
        pytest.approx([0.0, 0.1, 0.2, 0.3])


def test_deepcopy_and_teacher_without_drop_path():
    student = tiny(drop_path_rate=0.3)
    teacher = copy.deepcopy(student)
    assert torch.equal(teacher.pos_embed, student.pos_embed)
    spec = backbone_spec(student)
    spec["kwargs"]["drop_path_rate"] = 0.0
    assert all(getattr(b, "sample_drop_ratio", 0.0) == 0.0 for c in build_backbone_from_spec(spec).blocks for b in c)


def test_fully_shard_per_block_with_multicrop(tmp_path):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        model = tiny(block_chunks=0, drop_path_rate=0.0)
        reference = copy.deepcopy(model)
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        crops = [torch.randn(2, 3, 32, 32), torch.randn(3, 3, 16, 16)]
        with torch.no_grad():  # through forward(): FSDP2 hooks wrap forward only
            outs, refs = model(crops, masks=None, is_training=True), reference.forward_features(crops, None)
            assert all(torch.allclose(o["x_norm_clstoken"], r["x_norm_clstoken"], atol=1e-6) for o, r in zip(outs, refs))
        assert backbone_spec(model) == backbone_spec(reference)
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------- official parity
@pytest.fixture(scope="module")
def official():
    return pytest.importorskip("dinov2.models.vision_transformer")


def _pair(official, depth=2, **kwargs):
    """Official and our ViT-S-width model (384 dim, 6 heads) with ``depth`` blocks and the same weights."""
    from functools import partial

    from dinov2.layers import MemEffAttention, NestedTensorBlock

    from dinov2_core.models import DinoVisionTransformer

    torch.manual_seed(0)
    dims = {"embed_dim": 384, "depth": depth, "num_heads": 6, "mlp_ratio": 4}
    block = partial(NestedTensorBlock, attn_class=MemEffAttention)
    theirs = official.DinoVisionTransformer(block_fn=block, **dims, **kwargs).eval()
    ours = DinoVisionTransformer(**dims, **kwargs).eval()
    from dinov2_core.models.checkpoint_io import load_state_dict_strict, to_official_state_dict

    load_state_dict_strict(ours, theirs.state_dict())
    return theirs, ours, to_official_state_dict


def _max_diff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.official
@pytest.mark.parametrize("ffn_layer", ["mlp", "swiglufused"])
def test_official_parity_forward_features(official, ffn_layer):
    theirs, ours, to_official = _pair(official, ffn_layer=ffn_layer, **HUB)
    theirs.load_state_dict(to_official(ours), strict=True)  # and ours into theirs
    torch.manual_seed(1)
    for size in ((224, 224), (518, 518), (518, 266)):
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            a, b = theirs.forward_features(x), ours.forward_features(x)
        assert _max_diff(a["x_norm_clstoken"], b["x_norm_clstoken"]) <= 1e-5, size
        assert _max_diff(a["x_norm_patchtokens"], b["x_norm_patchtokens"]) <= 1e-5, size
        assert _max_diff(a["x_prenorm"], b["x_prenorm"]) <= 1e-4, size


@pytest.mark.official
def test_official_parity_chunked_and_intermediate_layers(official):
    kwargs = {"patch_size": 14, "img_size": 224, "init_values": 1e-5, "block_chunks": 2}
    theirs, ours, _ = _pair(official, depth=4, **kwargs)
    assert list(theirs.state_dict()) == list(ours.state_dict())  # identical chunked key order
    torch.manual_seed(2)
    x = torch.randn(2, 3, 224, 168)
    masks = torch.rand(2, 16 * 12) > 0.7
    with torch.no_grad():
        assert _max_diff(theirs(x), ours(x)) <= 1e-5
        assert _max_diff(theirs.forward_features(x, masks)["x_norm_patchtokens"],
                         ours.forward_features(x, masks)["x_norm_patchtokens"]) <= 1e-5
        for n in (3, [0, 2, 3]):
            a = theirs.get_intermediate_layers(x, n=n, reshape=True, return_class_token=True)
            b = ours.get_intermediate_layers(x, n=n, reshape=True, return_class_token=True)
            assert len(a) == len(b)
            for (pa, ca), (pb, cb) in zip(a, b):
                assert pa.shape == pb.shape and _max_diff(pa, pb) <= 1e-5 and _max_diff(ca, cb) <= 1e-5


@pytest.mark.official
@pytest.mark.parametrize("size", [(224, 224), (518, 518), (518, 266)])
def test_official_blocks_with_registers(official, size):
    """dinov2==0.0.1.dev2 predates registers: assemble the register-model token sequence by hand
    (recipe §1.2/§1.4: size= bicubic + antialias, registers after cls without pos-embed) and run the
    official blocks and norm on it."""
    torch.manual_seed(3)
    from dinov2_core.models import DinoVisionTransformer

    theirs, _, _ = _pair(official, **HUB)
    ours = DinoVisionTransformer(embed_dim=384, depth=2, num_heads=6, num_register_tokens=4,
                                 interpolate_antialias=True, interpolate_offset=0.0, **HUB).eval()
    state = dict(theirs.state_dict(), register_tokens=torch.randn(1, 4, 384))
    from dinov2_core.models.checkpoint_io import load_state_dict_strict

    load_state_dict_strict(ours, state)
    x = torch.randn(1, 3, *size)
    h, w = size[0] // 14, size[1] // 14
    with torch.no_grad():
        patches = theirs.patch_embed(x)
        grid = theirs.pos_embed[:, 1:].reshape(1, 37, 37, 384).permute(0, 3, 1, 2)
        if (h, w) != (37, 37):
            grid = F.interpolate(grid, size=(h, w), mode="bicubic", antialias=True)
        pos = grid.permute(0, 2, 3, 1).reshape(1, h * w, 384)
        tokens = torch.cat([theirs.cls_token + theirs.pos_embed[:, :1], state["register_tokens"], patches + pos], 1)
        for block in theirs.blocks:
            tokens = block(tokens)
        expected = theirs.norm(tokens)
        out = ours.forward_features(x)
    assert _max_diff(out["x_norm_clstoken"], expected[:, 0]) <= 1e-5
    assert _max_diff(out["x_norm_regtokens"], expected[:, 1:5]) <= 1e-5
    assert _max_diff(out["x_norm_patchtokens"], expected[:, 5:]) <= 1e-5


@pytest.mark.official
@pytest.mark.parametrize("arch,ffn_layer,chunks", [("vit_small", "mlp", 0), ("vit_base", "mlp", 0),
                                                   ("vit_large", "mlp", 4), ("vit_giant2", "swiglufused", 0),
                                                   ("vit_giant2", "swiglufused", 4)])
def test_official_state_dict_layout_all_sizes(official, arch, ffn_layer, chunks):
    """Same keys (in the same order) and shapes as the official builders, on the meta device."""
    kwargs = {**HUB, "block_chunks": chunks, "ffn_layer": ffn_layer, "drop_path_uniform": True}
    with torch.device("meta"):
        theirs = getattr(official, arch)(**kwargs).state_dict()
        ours = build_backbone(arch, **kwargs)
    assert [(k, tuple(v.shape)) for k, v in theirs.items()] == [(k, tuple(v.shape)) for k, v in ours.state_dict().items()]
    ours.load_state_dict(theirs, strict=True)
