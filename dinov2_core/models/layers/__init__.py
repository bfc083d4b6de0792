"""Building blocks of the DINOv2 ViT family (one concept per module)."""

from dinov2_core.models.layers.attention import ATTN_BACKENDS, Attention
from dinov2_core.models.layers.block import Block
from dinov2_core.models.layers.drop_path import DropPath
from dinov2_core.models.layers.layer_scale import LayerScale
from dinov2_core.models.layers.mlp import Mlp
from dinov2_core.models.layers.patch_embed import PatchEmbed
from dinov2_core.models.layers.pos_embed import interpolate_pos_embed
from dinov2_core.models.layers.swiglu_ffn import SwiGLUFFN

__all__ = [
    "ATTN_BACKENDS",
    "Attention",
    "Block",
    "DropPath",
    "LayerScale",
    "Mlp",
    "PatchEmbed",
    "SwiGLUFFN",
    "interpolate_pos_embed",
]
