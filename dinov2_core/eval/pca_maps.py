"""PCA feature maps, the figure known from the DINOv2 paper: patch features' first three principal
components shown as RGB, with the background masked.

Recipe (paper, section 7 "PCA of patch features"): fit a PCA jointly over the patches of all shown
images (so colours are comparable between them); threshold the first component to split foreground
from background; fit a second PCA on the foreground patches only and map its three components to RGB;
background patches are drawn black. The sign of a principal component is arbitrary, so the first
component is oriented such that the patches on the image border, where the background usually is,
score low. ``foreground_threshold=None`` skips the masking (one PCA over all patches).

:func:`write_pca_maps` writes one PNG grid: a row per image with the input crop beside its PCA map,
each panel upscaled (nearest neighbour, so patches stay visible as blocks) to ``panel_size`` pixels.
"""

from __future__ import annotations

import io
import os

import numpy as np
import torch
from PIL import Image, ImageDraw

from dinov2_core.eval.features import IMAGENET_MEAN, IMAGENET_STD
from dinov2_core.utils.atomic import atomic_write_bytes

#: Name of the figure :func:`write_pca_maps` writes (``<prefix>_maps.png``).
FIGURE_SUFFIX = "_maps.png"
_GAP = 8  # white pixels between panels and around the grid
_HEADER = 24  # height of the column-title strip


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


def _border(n: int, h: int, w: int) -> torch.Tensor:
    """(n·h·w,) True for patches on the border of their image's patch grid."""
    edge = torch.zeros(h, w, dtype=torch.bool)
    edge[0, :] = edge[-1, :] = edge[:, 0] = edge[:, -1] = True
    return edge.flatten().repeat(n)


def pca_foreground(
    patch_maps: torch.Tensor, foreground_threshold: float | None = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D, h, w) patch features → ``(colours, foreground)``: (N, h, w, 3) RGB in [0, 1] and an
    (N, h, w) bool mask.

    The first principal component over all patches, oriented so border patches score low and min-max
    scaled to [0, 1], marks a patch as foreground when above ``foreground_threshold``; the colours are
    a second 3-component PCA over the foreground patches only, background is black. If fewer than two
    patches pass (or the threshold is ``None``) every patch counts as foreground.
    """
    n, dim, h, w = patch_maps.shape
    patches = patch_maps.permute(0, 2, 3, 1).reshape(-1, dim)
    foreground = torch.ones(patches.shape[0], dtype=torch.bool)
    if foreground_threshold is not None:
        first = _top3_projection(patches)[:, 0]
        border = _border(n, h, w)
        if not border.all() and first[border].mean() > first[~border].mean():
            first = -first
        foreground = _minmax(first[:, None])[:, 0] > foreground_threshold
        if foreground.sum() < 2:  # threshold removed (almost) everything: fall back to all patches
            foreground[:] = True
    colours = torch.zeros(patches.shape[0], 3, dtype=torch.float64)
    colours[foreground] = _minmax(_top3_projection(patches[foreground]))
    return colours.reshape(n, h, w, 3).float(), foreground.reshape(n, h, w)


def pca_rgb(patch_maps: torch.Tensor, foreground_threshold: float | None = None) -> torch.Tensor:
    """(N, D, h, w) patch features → (N, h, w, 3) colours in [0, 1] (see :func:`pca_foreground`)."""
    return pca_foreground(patch_maps, foreground_threshold)[0]


def denormalise(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) ImageNet-normalised tensor → (H, W, 3) uint8."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    pixels = (image.float().cpu() * std + mean).clamp(0, 1)
    return (pixels.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def _panel(pixels: np.ndarray, height: int) -> Image.Image:
    """``pixels`` (h, w, 3) uint8 scaled with nearest neighbour to ``height`` rows, aspect kept."""
    width = max(1, round(pixels.shape[1] * height / pixels.shape[0]))
    return Image.fromarray(pixels).resize((width, height), Image.NEAREST)


def render_pca_figure(images: torch.Tensor, colours: torch.Tensor, panel_size: int = 224) -> Image.Image:
    """One RGB grid: a row per image, the crop (left) beside its PCA map (right), each ``panel_size``
    pixels high, under a title strip."""
    crops = [_panel(denormalise(image), panel_size) for image in images]
    maps = [_panel((c.numpy() * 255).round().astype(np.uint8), panel_size) for c in colours]
    width = crops[0].width
    figure = Image.new("RGB", (3 * _GAP + 2 * width, _HEADER + _GAP + len(crops) * (panel_size + _GAP)), "white")
    draw = ImageDraw.Draw(figure)
    for column, title in enumerate(("image", "PCA of patch features")):
        draw.text((_GAP + column * (width + _GAP), 6), title, fill="black")
    for row, (crop, pca) in enumerate(zip(crops, maps)):
        top = _HEADER + row * (panel_size + _GAP)
        figure.paste(crop, (_GAP, top))
        figure.paste(pca, (2 * _GAP + width, top))
    return figure


def write_pca_maps(
    images: torch.Tensor,
    patch_maps: torch.Tensor,
    output_dir: str | os.PathLike,
    foreground_threshold: float | None = 0.5,
    prefix: str = "pca",
    panel_size: int = 224,
) -> list[str]:
    """Write the figure ``<output_dir>/<prefix>_maps.png`` for the N (3, H, W) normalised ``images``
    and their (N, D, h, w) ``patch_maps``; returns ``[path]``."""
    if panel_size < 1:
        raise ValueError(f"panel_size must be >= 1, got {panel_size}")
    colours, _ = pca_foreground(patch_maps, foreground_threshold)
    buffer = io.BytesIO()
    render_pca_figure(images, colours, panel_size).save(buffer, format="PNG")
    path = os.path.join(os.fspath(output_dir), prefix + FIGURE_SUFFIX)
    atomic_write_bytes(path, buffer.getvalue())
    return [path]
