"""Multi-head self-attention over one or several crop batches (``qkv`` and ``proj`` keys as in the official ViTs).

Backends (``attn_backend``):

- ``"sdpa"`` (default): ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient
  kernels on GPU, fused math on CPU).
- ``"xformers"``: ``xformers.ops.memory_efficient_attention`` when xFormers is importable and the
  input is on CUDA; otherwise SDPA (xFormers has no CPU kernels).
- ``"math"``: explicit matmul → softmax → matmul, the reference the fused kernels are compared and
  benchmarked against.

Multi-crop inputs arrive packed (see ``token_packing``): the ``qkv``/``proj`` Linears run once on all
tokens, attention runs per crop group so that each image only attends to itself.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from dinov2_core.models.layers.token_packing import TokenShapes, pack_tokens, unpack_tokens

AttnBackend = Literal["sdpa", "xformers", "math"]
ATTN_BACKENDS: tuple[str, ...] = ("sdpa", "xformers", "math")

logger = logging.getLogger(__name__)


def _load_xformers_attention():
    try:
        from xformers.ops import memory_efficient_attention
    except ImportError:
        return None
    return memory_efficient_attention


def math_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Softmax(q·kᵀ/√d)·v on (B, H, N, Dh) tensors, computed step by step."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    return scores.softmax(dim=-1) @ v


class Attention(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        attn_backend: AttnBackend = "sdpa",
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by num_heads {num_heads}")
        if attn_backend not in ATTN_BACKENDS:
            raise ValueError(f"attn_backend={attn_backend!r} is not supported; allowed: {list(ATTN_BACKENDS)}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_backend = attn_backend
        self._xformers_attention = _load_xformers_attention() if attn_backend == "xformers" else None
        if attn_backend == "xformers" and self._xformers_attention is None:
            logger.warning("attn_backend='xformers' requested but xformers is not importable; using SDPA")
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x: Tensor) -> Tensor:
        """(B, N, D) → (B, N, D)."""
        packed, shapes = pack_tokens([x])
        return unpack_tokens(self.forward_packed(packed, shapes), shapes)[0]

    def forward_packed(self, packed: Tensor, shapes: TokenShapes) -> Tensor:
        """Packed tokens of several crop groups (ΣB·N, D) → same layout; attention within each image."""
        outputs = [self._attend(qkv) for qkv in unpack_tokens(self.qkv(packed), shapes)]
        merged, _ = pack_tokens(outputs)
        return self.proj(merged)

    def _attend(self, qkv: Tensor) -> Tensor:
        batch, tokens, _ = qkv.shape
        qkv = qkv.view(batch, tokens, 3, self.num_heads, self.head_dim)
        if self._xformers_attention is not None and qkv.is_cuda:
            q, k, v = qkv.unbind(2)  # xFormers wants (B, N, H, Dh)
            out = self._xformers_attention(q, k, v)
            return out.reshape(batch, tokens, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, Dh) each
        out = math_attention(q, k, v) if self.attn_backend == "math" else F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2).reshape(batch, tokens, -1)
