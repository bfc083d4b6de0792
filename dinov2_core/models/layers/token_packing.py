"""Pack the token sequences of several crop batches into one matrix and unpack them again.

Multi-crop training feeds crops of different resolutions (e.g. 2×224 px and 8×98 px) through the
same backbone. Every token-wise layer (LayerNorm, Linear, MLP) is shared, so running it once on the
concatenation of all crops' tokens turns many small kernels into one large one; only attention
needs the per-crop (B, N, D) shapes back.
"""

from __future__ import annotations

import torch
from torch import Tensor

TokenShapes = list[torch.Size]


def pack_tokens(xs: list[Tensor]) -> tuple[Tensor, TokenShapes]:
    """Flatten each (B_i, N_i, D) tensor to (B_i·N_i, D) and concatenate them along the first dim."""
    shapes = [x.shape for x in xs]
    if len(xs) == 1:
        return xs[0].reshape(-1, xs[0].shape[-1]), shapes
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in xs], dim=0), shapes


def unpack_tokens(packed: Tensor, shapes: TokenShapes) -> list[Tensor]:
    """Inverse of :func:`pack_tokens`; the last dim of ``packed`` may differ from the packed input's."""
    sizes = [shape[0] * shape[1] for shape in shapes]
    chunks = packed.split(sizes, dim=0) if len(shapes) > 1 else (packed,)
    return [chunk.view(shape[0], shape[1], packed.shape[-1]) for chunk, shape in zip(chunks, shapes)]
