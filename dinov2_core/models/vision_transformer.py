"""The DINOv2 Vision Transformer family (ViT-S/B/L/g plus small test sizes).

The module tree and ``state_dict`` keys equal the official ``dinov2`` backbones, so official hub
checkpoints load strictly and code written against the official public surface
(``forward_features``, ``forward``, ``get_intermediate_layers``) runs unchanged. Differences are in
the execution only: multi-crop lists are packed token-wise with attention per crop group through
PyTorch SDPA (no xFormers nested tensors), and image sides that are not multiples of the patch size
raise a ``ValueError`` with the nearest valid sizes instead of an ``AssertionError``.

Token order: ``[cls, reg_1..reg_R, patch_1..patch_N]``; registers get no position embedding.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn
from torch import Tensor
from torch.nn.init import trunc_normal_

from dinov2_core.models.heads import ParameterInit, conv_default_inits
from dinov2_core.models.layers.attention import ATTN_BACKENDS, AttnBackend
from dinov2_core.models.layers.block import LAYER_NORM_EPS, Block
from dinov2_core.models.layers.layer_scale import LayerScale
from dinov2_core.models.layers.mlp import Mlp
from dinov2_core.models.layers.patch_embed import PatchEmbed, check_image_size
from dinov2_core.models.layers.pos_embed import interpolate_pos_embed
from dinov2_core.models.layers.swiglu_ffn import SwiGLUFFN

FFN_LAYERS: tuple[str, ...] = ("mlp", "swiglu", "swiglufused", "identity")


class BlockChunk(nn.ModuleList):
    """A run of consecutive blocks, padded with ``nn.Identity`` so keys keep the global block index."""

    def forward(self, x):
        for block in self:
            if not isinstance(block, nn.Identity):
                x = block(x)
        return x


def _ffn_factory(ffn_layer: str, dim: int, hidden: int, bias: bool):
    if ffn_layer == "mlp":
        return partial(Mlp, dim, hidden, bias)
    if ffn_layer in ("swiglu", "swiglufused"):
        return partial(SwiGLUFFN, dim, hidden, bias)
    if ffn_layer == "identity":
        return nn.Identity
    raise ValueError(f"ffn_layer={ffn_layer!r} is not supported; allowed: {list(FFN_LAYERS)}")


class DinoVisionTransformer(nn.Module):
    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        ffn_bias: bool = True,
        proj_bias: bool = True,
        drop_path_rate: float = 0.0,
        drop_path_uniform: bool = False,
        init_values: float | None = None,
        ffn_layer: str = "mlp",
        block_chunks: int = 1,
        num_register_tokens: int = 0,
        interpolate_antialias: bool = False,
        interpolate_offset: float = 0.1,
        attn_backend: AttnBackend = "sdpa",
    ):
        """
        Args:
            img_size: training image side; fixes the size of ``pos_embed`` ((img_size/patch_size)² + 1 slots).
            patch_size: patch side in pixels (14 for the released models).
            in_chans: input channels.
            embed_dim, depth, num_heads, mlp_ratio: width, number of blocks, heads, FFN expansion.
            qkv_bias, proj_bias, ffn_bias: biases of the attention input/output and FFN Linears.
            drop_path_rate: stochastic-depth rate (0 for teachers and evaluation).
            drop_path_uniform: same rate in every block; otherwise linearly increasing from 0.
            init_values: LayerScale init (1e-5 in training, 1.0 for hub models); None/0 → no LayerScale.
            ffn_layer: one of ``mlp``, ``swiglu``, ``swiglufused`` (packed ``w12``), ``identity``.
            block_chunks: group blocks into this many ``BlockChunk`` units (keys ``blocks.<chunk>.<i>``);
                0 keeps a flat ``blocks.<i>`` list (hub format). ``depth`` must be divisible by it.
            num_register_tokens: number of register tokens (4 for ``_reg4`` models).
            interpolate_antialias, interpolate_offset: pos-embed resize family (see ``layers.pos_embed``).
            attn_backend: ``sdpa`` (default), ``xformers`` (used only if importable) or ``math``.
        """
        super().__init__()
        if ffn_layer not in FFN_LAYERS:
            raise ValueError(f"ffn_layer={ffn_layer!r} is not supported; allowed: {list(FFN_LAYERS)}")
        if attn_backend not in ATTN_BACKENDS:
            raise ValueError(f"attn_backend={attn_backend!r} is not supported; allowed: {list(ATTN_BACKENDS)}")
        if block_chunks < 0 or (block_chunks > 0 and depth % block_chunks):
            raise ValueError(f"block_chunks={block_chunks} must be 0 or divide depth={depth}")
        if num_register_tokens < 0:
            raise ValueError(f"num_register_tokens={num_register_tokens} must be >= 0")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate={drop_path_rate} must be in [0, 1)")
        check_image_size(img_size, img_size, patch_size)

        self.num_features = self.embed_dim = embed_dim
        self.num_tokens = 1
        self.n_blocks = depth
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.num_register_tokens = num_register_tokens
        self.interpolate_antialias = interpolate_antialias
        self.interpolate_offset = interpolate_offset

        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + self.num_tokens, embed_dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if num_register_tokens else None
        )

        if drop_path_uniform or depth == 1:
            rates = [drop_path_rate] * depth
        else:  # linear decay rule; plain Python so that meta-device construction works
            rates = [drop_path_rate * i / (depth - 1) for i in range(depth)]
        ffn = _ffn_factory(ffn_layer, embed_dim, int(embed_dim * mlp_ratio), ffn_bias)
        blocks = [
            Block(
                dim=embed_dim,
                num_heads=num_heads,
                ffn=ffn,
                qkv_bias=qkv_bias,
                proj_bias=proj_bias,
                drop_path=rates[i],
                init_values=init_values,
                attn_backend=attn_backend,
            )
            for i in range(depth)
        ]
        self.chunked_blocks = block_chunks > 0
        if self.chunked_blocks:
            size = depth // block_chunks
            self.blocks = nn.ModuleList(
                BlockChunk([nn.Identity()] * start + blocks[start : start + size]) for start in range(0, depth, size)
            )
        else:
            self.blocks = nn.ModuleList(blocks)

        self.norm = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        self.head = nn.Identity()
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.init_weights()

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re-)initialise every parameter (recipe §1.1); also valid after ``to_empty`` from the meta device."""
        for name, init in self.parameter_inits():
            init(self.get_parameter(name))

    def parameter_inits(self) -> list[tuple[str, ParameterInit]]:
        """``(parameter name, in-place init)`` for every parameter, in the order :meth:`init_weights` draws
        them. The init of one parameter depends only on its full shape, so a sharded trainer can draw each
        one full-size, keep its shard, and get the same weights at any world size."""
        inits: list[tuple[str, ParameterInit]] = [("pos_embed", partial(trunc_normal_, std=0.02)),
                                                  ("cls_token", partial(nn.init.normal_, std=1e-6))]
        if self.register_tokens is not None:
            inits.append(("register_tokens", partial(nn.init.normal_, std=1e-6)))
        inits.append(("mask_token", nn.init.zeros_))
        inits.extend(conv_default_inits("patch_embed.proj", self.patch_embed.proj))
        for prefix, module in self.named_modules():
            if isinstance(module, nn.Linear):
                inits.append((f"{prefix}.weight", partial(trunc_normal_, std=0.02)))
                if module.bias is not None:
                    inits.append((f"{prefix}.bias", nn.init.zeros_))
            elif isinstance(module, nn.LayerNorm):
                inits += [(f"{prefix}.weight", nn.init.ones_), (f"{prefix}.bias", nn.init.zeros_)]
            elif isinstance(module, LayerScale):
                inits.append((f"{prefix}.gamma", partial(nn.init.constant_, val=float(module.init_values))))
        return inits

    # ---------------------------------------------------------------- tokens
    def interpolate_pos_encoding(self, x: Tensor, w: int, h: int) -> Tensor:
        """Position embedding for tokens ``x`` of an image of ``w``×``h`` pixels (official order: height first).

        As in the official code, a resized embedding takes the dtype of ``x`` while the stored one is
        returned as is, so mixed-precision results match the official backbones.
        """
        pos_embed = interpolate_pos_embed(
            self.pos_embed,
            w // self.patch_size,
            h // self.patch_size,
            offset=self.interpolate_offset,
            antialias=self.interpolate_antialias,
        )
        return pos_embed if pos_embed is self.pos_embed else pos_embed.to(x.dtype)

    def prepare_tokens_with_masks(self, x: Tensor, masks: Tensor | None = None) -> Tensor:
        """Image (B, C, H, W) → tokens (B, 1+R+N, D); ``masks`` (B, N) bool swaps patches for ``mask_token``."""
        _, _, height, width = x.shape
        check_image_size(height, width, self.patch_size)
        x = self.patch_embed(x)
        if masks is not None:
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = x + self.interpolate_pos_encoding(x, height, width)
        if self.register_tokens is not None:
            x = torch.cat((x[:, :1], self.register_tokens.expand(x.shape[0], -1, -1), x[:, 1:]), dim=1)
        return x

    def _iter_blocks(self) -> Iterator[nn.Module]:
        """The real blocks in order (chunk padding skipped)."""
        for module in self.blocks:
            if isinstance(module, BlockChunk):
                yield from (block for block in module if not isinstance(block, nn.Identity))
            else:
                yield module

    def _split_outputs(self, x: Tensor, masks: Tensor | None) -> dict[str, Tensor | None]:
        x_norm = self.norm(x)
        registers_end = 1 + self.num_register_tokens
        return {
            "x_norm_clstoken": x_norm[:, 0],
            "x_norm_regtokens": x_norm[:, 1:registers_end],
            "x_norm_patchtokens": x_norm[:, registers_end:],
            "x_prenorm": x,
            "masks": masks,
        }

    # --------------------------------------------------------------- forward
    def forward_features_list(self, x_list: list[Tensor], masks_list: Sequence[Tensor | None] | None) -> list[dict]:
        """Multi-crop forward: one output dict per crop batch; all crops share each block call."""
        masks_list = [None] * len(x_list) if masks_list is None else list(masks_list)
        if len(masks_list) != len(x_list):
            raise ValueError(f"got {len(x_list)} crop batches but {len(masks_list)} masks")
        xs = [self.prepare_tokens_with_masks(x, m) for x, m in zip(x_list, masks_list)]
        for block in self.blocks:
            xs = block(xs)
        return [self._split_outputs(x, m) for x, m in zip(xs, masks_list)]

    def forward_features(self, x: Tensor | list[Tensor], masks=None):
        """Dict of ``x_norm_clstoken``, ``x_norm_regtokens``, ``x_norm_patchtokens``, ``x_prenorm``, ``masks``;
        a list of such dicts when ``x`` is a list of crop batches (``masks`` then a list too)."""
        if isinstance(x, list):
            return self.forward_features_list(x, masks)
        x = self.prepare_tokens_with_masks(x, masks)
        for block in self.blocks:
            x = block(x)
        return self._split_outputs(x, masks)

    def forward(self, *args: Any, is_training: bool = False, **kwargs: Any):
        """The normed cls embedding (B, D); with ``is_training=True`` the ``forward_features`` output."""
        features = self.forward_features(*args, **kwargs)
        if is_training:
            return features
        return self.head(features["x_norm_clstoken"])

    def get_intermediate_layers(
        self,
        x: Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ) -> tuple:
        """Patch tokens of the last ``n`` blocks (int) or of the listed block indices.

        ``reshape`` gives (B, D, H/p, W/p); ``return_class_token`` gives (patch_tokens, cls_token) pairs.
        """
        take = range(self.n_blocks - n, self.n_blocks) if isinstance(n, int) else list(n)
        wanted = set(take)
        tokens = self.prepare_tokens_with_masks(x)
        outputs = []
        for index, block in enumerate(self._iter_blocks()):
            tokens = block(tokens)
            if index in wanted:
                outputs.append(tokens)
        if len(outputs) != len(take):
            raise ValueError(f"requested blocks {list(take)} but the model has {self.n_blocks} blocks")
        if norm:
            outputs = [self.norm(out) for out in outputs]
        class_tokens = [out[:, 0] for out in outputs]
        patches = [out[:, 1 + self.num_register_tokens :] for out in outputs]
        if reshape:
            batch, _, height, width = x.shape
            grid = (height // self.patch_size, width // self.patch_size)
            patches = [p.reshape(batch, *grid, -1).permute(0, 3, 1, 2).contiguous() for p in patches]
        if return_class_token:
            return tuple(zip(patches, class_tokens))
        return tuple(patches)


# --------------------------------------------------------------------- builders
_ARCHS: dict[str, dict[str, Any]] = {
    "vit_test": {"embed_dim": 64, "depth": 4, "num_heads": 2},
    "vit_tiny": {"embed_dim": 192, "depth": 12, "num_heads": 3},
    "vit_small": {"embed_dim": 384, "depth": 12, "num_heads": 6},
    "vit_base": {"embed_dim": 768, "depth": 12, "num_heads": 12},
    "vit_large": {"embed_dim": 1024, "depth": 24, "num_heads": 16},
    "vit_giant2": {"embed_dim": 1536, "depth": 40, "num_heads": 24},
}
ARCH_NAMES: tuple[str, ...] = tuple(_ARCHS)

# Keyword arguments a builder accepts (the size-defining ones are fixed by the arch).
BUILDER_KWARGS: tuple[str, ...] = (
    "img_size",
    "patch_size",
    "in_chans",
    "qkv_bias",
    "ffn_bias",
    "proj_bias",
    "drop_path_rate",
    "drop_path_uniform",
    "init_values",
    "ffn_layer",
    "block_chunks",
    "num_register_tokens",
    "interpolate_antialias",
    "interpolate_offset",
    "attn_backend",
)


def arch_dims(arch: str) -> dict[str, Any]:
    """``embed_dim``, ``depth`` and ``num_heads`` of a named architecture."""
    if arch not in _ARCHS:
        raise ValueError(f"unknown backbone arch {arch!r}; allowed: {list(ARCH_NAMES)}")
    return dict(_ARCHS[arch])


def _build(arch: str, patch_size: int, kwargs: dict[str, Any]) -> DinoVisionTransformer:
    unknown = sorted(set(kwargs) - set(BUILDER_KWARGS))
    if unknown:
        raise ValueError(f"unknown backbone kwargs {unknown}; allowed: {list(BUILDER_KWARGS)}")
    model = DinoVisionTransformer(patch_size=patch_size, mlp_ratio=4, **arch_dims(arch), **kwargs)
    model.arch = arch
    model.builder_kwargs = {"patch_size": patch_size, **kwargs}
    return model


def vit_test(patch_size: int = 16, **kwargs: Any) -> DinoVisionTransformer:
    """64-dim, 4 blocks, 2 heads: for unit tests on 16–32 px images."""
    return _build("vit_test", patch_size, kwargs)


def vit_tiny(patch_size: int = 16, **kwargs: Any) -> DinoVisionTransformer:
    """ViT-Ti: 192-dim, 12 blocks, 3 heads."""
    return _build("vit_tiny", patch_size, kwargs)


def vit_small(patch_size: int = 16, **kwargs: Any) -> DinoVisionTransformer:
    """ViT-S: 384-dim, 12 blocks, 6 heads."""
    return _build("vit_small", patch_size, kwargs)


def vit_base(patch_size: int = 16, **kwargs: Any) -> DinoVisionTransformer:
    """ViT-B: 768-dim, 12 blocks, 12 heads."""
    return _build("vit_base", patch_size, kwargs)


def vit_large(patch_size: int = 16, **kwargs: Any) -> DinoVisionTransformer:
    """ViT-L: 1024-dim, 24 blocks, 16 heads."""
    return _build("vit_large", patch_size, kwargs)


def vit_giant2(patch_size: int = 16, **kwargs: Any) -> DinoVisionTransformer:
    """ViT-g (DINOv2 variant): 1536-dim, 40 blocks, 24 heads of dim 64."""
    return _build("vit_giant2", patch_size, kwargs)
