"""Dense linear probe on a separable mask task, mIoU by hand, and the PCA feature-map figure."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from dinov2_core.eval.config import DenseConfig
from dinov2_core.eval.dense import confusion_matrix, dense_probe, mean_iou
from dinov2_core.eval.features import IMAGENET_MEAN, IMAGENET_STD
from dinov2_core.eval.pca_maps import pca_foreground, pca_rgb, write_pca_maps


def test_mean_iou_by_hand():
    target = torch.tensor([0, 0, 1, 1, 2, 255])
    pred = torch.tensor([0, 1, 1, 1, 0, 2])
    confusion = confusion_matrix(pred, target, num_classes=3, ignore_index=255)
    miou, per_class = mean_iou(confusion)
    # class 0: tp 1, union 3; class 1: tp 2, union 3; class 2: tp 0, union 1
    assert per_class == pytest.approx([1 / 3, 2 / 3, 0.0])
    assert miou == pytest.approx((1 / 3 + 2 / 3 + 0.0) / 3)


def test_dense_probe_learns_a_separable_mask_task():
    generator = torch.Generator().manual_seed(0)
    patch_labels = torch.randint(0, 3, (12, 4, 4), generator=generator)  # 4x4 patches of 4x4 pixels
    features = torch.nn.functional.one_hot(patch_labels, 3).permute(0, 3, 1, 2).float()
    features = features + 0.05 * torch.randn(features.shape, generator=generator)
    masks = patch_labels.repeat_interleave(4, dim=1).repeat_interleave(4, dim=2)
    masks[0, 0, 0] = 255  # ignored pixel
    result = dense_probe(features, masks, DenseConfig(iterations=150, lr=0.05, batch_size=8))
    assert result["miou"] > 0.9
    assert result["num_heldout_images"] == 3


def test_pca_figure_has_one_row_per_image_with_large_panels(tmp_path):
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, 32, 48, generator=generator)
    patch_maps = torch.randn(3, 16, 4, 6, generator=generator)
    paths = write_pca_maps(images, patch_maps, str(tmp_path), panel_size=224)
    assert [os.path.basename(p) for p in paths] == ["pca_maps.png"]
    with Image.open(paths[0]) as figure:
        panel_width = 48 * 224 // 32  # aspect ratio kept
        gap, header = 8, 24
        assert figure.mode == "RGB"
        assert figure.size == (3 * gap + 2 * panel_width, header + gap + 3 * (224 + gap))
    colours = pca_rgb(patch_maps, foreground_threshold=0.5)
    assert colours.shape == (3, 4, 6, 3)
    assert 0.0 <= colours.min() and colours.max() <= 1.0
    assert (colours.sum(-1) == 0).any()  # background patches are black
    with pytest.raises(ValueError, match="panel_size"):
        write_pca_maps(images, patch_maps, str(tmp_path), panel_size=0)


def _object_on_uniform_background(offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A 64 px grey image with a textured red 24 px square at (offset, offset); object patches (8 px)."""
    generator = torch.Generator().manual_seed(offset)
    image = torch.full((3, 64, 64), 0.5)
    square = torch.rand(3, 24, 24, generator=generator) * 0.3
    square[0] += 0.7
    image[:, offset:offset + 24, offset:offset + 24] = square
    object_patches = torch.zeros(8, 8, dtype=torch.bool)
    object_patches[offset // 8:offset // 8 + 3, offset // 8:offset // 8 + 3] = True
    return image, object_patches


def test_first_component_threshold_separates_object_from_uniform_background(tmp_path):
    pairs = [_object_on_uniform_background(offset) for offset in (8, 24, 32)]
    images = torch.stack([image for image, _ in pairs])
    truth = torch.stack([mask for _, mask in pairs])
    # raw 8x8 patch pixels as the "features": the object's patches differ from the background's
    patch_maps = images.unfold(2, 8, 8).unfold(3, 8, 8).permute(0, 1, 4, 5, 2, 3).reshape(3, 3 * 64, 8, 8)
    colours, foreground = pca_foreground(patch_maps, foreground_threshold=0.5)
    assert torch.equal(foreground, truth)
    assert (colours[~truth] == 0).all() and (colours[truth].sum(-1) > 0).all()
    # and the figure shows it: background panel pixels black, object panel pixels not
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    path = write_pca_maps((images - mean) / std, patch_maps, str(tmp_path), 0.5, panel_size=224)[0]
    figure = np.asarray(Image.open(path))
    gap, header, cell = 8, 24, 224 // 8
    pca_panel = figure[header:header + 224, 2 * gap + 224:2 * gap + 448]
    for row in range(8):
        for column in range(8):
            pixel = pca_panel[row * cell + cell // 2, column * cell + cell // 2]
            assert (pixel.sum() > 0) == bool(truth[0, row, column]), (row, column)
