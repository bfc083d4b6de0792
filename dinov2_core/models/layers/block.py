"""Pre-norm transformer block: ``x + ls1(attn(norm1(x)))`` then ``x + ls2(mlp(norm2(x)))``.

The block accepts a tensor (B, N, D) or a list of them (one per crop resolution). Lists are packed so
that the norms, Linears and FFN run once over all crops, with attention per crop group. In training,
stochastic depth uses the batch-subset residual for rates above 0.1 and per-sample ``DropPath``
otherwise, with independent draws for the attention and FFN branches and for each crop group.
"""

from __future__ import annotations

from typing import Callable

import torch.nn as nn
from torch import Tensor

from dinov2_core.models.layers.attention import Attention, AttnBackend
from dinov2_core.models.layers.drop_path import SUBSET_RESIDUAL_MIN_RATE, DropPath, add_residual_on_subset
from dinov2_core.models.layers.layer_scale import LayerScale
from dinov2_core.models.layers.token_packing import pack_tokens, unpack_tokens

LAYER_NORM_EPS = 1e-6


class Block(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        ffn: Callable[[], nn.Module],
        qkv_bias: bool = True,
        proj_bias: bool = True,
        drop_path: float = 0.0,
        init_values: float | None = None,
        attn_backend: AttnBackend = "sdpa",
    ):
        """``ffn`` builds the feed-forward module (``Mlp``, ``SwiGLUFFN`` or ``nn.Identity``)."""
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias, attn_backend=attn_backend)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = ffn()
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.sample_drop_ratio = drop_path
        self.drop_path1 = DropPath(drop_path)
        self.drop_path2 = DropPath(drop_path)

    def _attn_branch(self, xs: list[Tensor]) -> list[Tensor]:
        packed, shapes = pack_tokens(xs)
        return unpack_tokens(self.ls1(self.attn.forward_packed(self.norm1(packed), shapes)), shapes)

    def _ffn_branch(self, xs: list[Tensor]) -> list[Tensor]:
        packed, shapes = pack_tokens(xs)
        return unpack_tokens(self.ls2(self.mlp(self.norm2(packed))), shapes)

    def _add(self, xs: list[Tensor], branch, drop: DropPath) -> list[Tensor]:
        rate = self.sample_drop_ratio
        if self.training and rate > SUBSET_RESIDUAL_MIN_RATE:
            return add_residual_on_subset(xs, branch, rate)
        residuals = branch(xs)
        if self.training and rate > 0.0:
            residuals = [drop(r) for r in residuals]
        return [x + r for x, r in zip(xs, residuals)]

    def forward(self, x: Tensor | list[Tensor]) -> Tensor | list[Tensor]:
        xs = x if isinstance(x, list) else [x]
        xs = self._add(xs, self._attn_branch, self.drop_path1)
        xs = self._add(xs, self._ffn_branch, self.drop_path2)
        return xs if isinstance(x, list) else xs[0]
