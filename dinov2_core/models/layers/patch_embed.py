"""Patch embedding: a strided convolution that turns an image into a sequence of patch tokens."""

from __future__ import annotations

import torch.nn as nn
from torch import Tensor


def nearest_valid_sizes(side: int, patch_size: int) -> list[int]:
    """The multiples of ``patch_size`` just below and above ``side`` (the smaller one at least one patch)."""
    below = max(side // patch_size, 1) * patch_size
    above = -(-side // patch_size) * patch_size
    return sorted({below, above})


def check_image_size(height: int, width: int, patch_size: int) -> None:
    """Raise ValueError naming the size, the patch size and the nearest valid sizes if a side is not a multiple."""
    if height % patch_size == 0 and width % patch_size == 0:
        return
    hints = []
    for name, side in (("height", height), ("width", width)):
        if side % patch_size:
            valid = " or ".join(str(s) for s in nearest_valid_sizes(side, patch_size))
            hints.append(f"{name} {side} -> {valid}")
    raise ValueError(
        f"image size {height}x{width} is not a multiple of the patch size {patch_size}; "
        f"nearest valid sizes: {'; '.join(hints)} (resize or crop the input)"
    )


class PatchEmbed(nn.Module):
    """(B, C, H, W) image → (B, H/p · W/p, D) tokens, row-major over the patch grid; no norm."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        check_image_size(img_size, img_size, patch_size)
        self.img_size = img_size
        self.patch_size = patch_size
        self.patches_resolution = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.patches_resolution[0] * self.patches_resolution[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        check_image_size(x.shape[-2], x.shape[-1], self.patch_size)
        return self.proj(x).flatten(2).transpose(1, 2)
