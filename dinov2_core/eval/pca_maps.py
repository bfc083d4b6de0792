"""PCA feature maps: the first three principal components of patch features shown as RGB.

The components are fitted jointly over the patches of a few images (so colours are comparable
between them). With ``foreground_threshold`` the patches whose first component (min-max scaled to
[0, 1]) is at or below the threshold are treated as background, drawn black, and the PCA is refitted on
the remaining patches, as in the DINOv2 paper's figures. The sign of a principal component is
arbitrary, so on some models the "foreground" side of the first component can be the background.
Each PNG shows the input crop on the left and its map (nearest-upsampled to the crop) on the right.
"""

from __future__ import annotations

import io
import os

import numpy as np
import torch
from PIL import Image

from dinov2_core.eval.features import IMAGENET_MEAN, IMAGENET_STD
from dinov2_core.utils.atomic import atomic_write_bytes


def _top3_projection(patches: torch.Tensor) -> torch.Tensor:
    centered = patches.double() - patches.double().mean(dim=0, keepdim=True)
    _, _, vh = torch.linalg.svd(centered, full_matrices=False)
    components = vh[: min(3, vh.shape[0])]
    projection = centered @ components.T
    if projection.shape[1] < 3:  # fewer patches / dims than 3 components: pad with zeros
        projection = torch.cat([projection, projection.new_zeros(projection.shape[0], 3 - projection.shape[1])], 1)
    return projection


def _minmax(values: torch.Tensor) -> torch.Tensor:
    low, high = values.min(dim=0).values, values.max(dim=0).values
    return (values - low) / (high - low).clamp(min=1e-12)


def pca_rgb(patch_maps: torch.Tensor, foreground_threshold: float | None = None) -> torch.Tensor:
    """(N, D, h, w) patch features → (N, h, w, 3) colours in [0, 1] from a joint 3-component PCA."""
    n, dim, h, w = patch_maps.shape
    patches = patch_maps.permute(0, 2, 3, 1).reshape(-1, dim)
    colours = torch.zeros(patches.shape[0], 3, dtype=torch.float64)
    keep = torch.ones(patches.shape[0], dtype=torch.bool)
    if foreground_threshold is not None:
        first = _minmax(_top3_projection(patches)[:, :1])[:, 0]
        keep = first > foreground_threshold
        if keep.sum() < 2:  # threshold removed (almost) everything: fall back to all patches
            keep[:] = True
    colours[keep] = _minmax(_top3_projection(patches[keep]))
    return colours.reshape(n, h, w, 3).float()


def denormalise(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) ImageNet-normalised tensor → (H, W, 3) uint8."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    pixels = (image.float().cpu() * std + mean).clamp(0, 1)
    return (pixels.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def render_pca_panel(image: torch.Tensor, colours: torch.Tensor) -> Image.Image:
    """The crop and its PCA map side by side: a (2W, H) RGB image."""
    crop = Image.fromarray(denormalise(image))
    width, height = crop.size
    pca = Image.fromarray((colours.numpy() * 255).round().astype(np.uint8)).resize((width, height), Image.NEAREST)
    panel = Image.new("RGB", (2 * width, height))
    panel.paste(crop, (0, 0))
    panel.paste(pca, (width, 0))
    return panel


def write_pca_maps(
    images: torch.Tensor,
    patch_maps: torch.Tensor,
    output_dir: str | os.PathLike,
    foreground_threshold: float | None = None,
    prefix: str = "pca",
) -> list[str]:
    """Write ``<prefix>_000.png`` … for each image; returns the paths."""
    colours = pca_rgb(patch_maps, foreground_threshold)
    paths = []
    for index in range(images.shape[0]):
        buffer = io.BytesIO()
        render_pca_panel(images[index], colours[index]).save(buffer, format="PNG")
        path = os.path.join(os.fspath(output_dir), f"{prefix}_{index:03d}.png")
        atomic_write_bytes(path, buffer.getvalue())
        paths.append(path)
    return paths
