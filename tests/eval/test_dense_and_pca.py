"""Dense linear probe on a separable mask task, mIoU by hand, and PCA map PNGs."""

from __future__ import annotations

import os

import pytest
import torch
from PIL import Image

from dinov2_core.eval.config import DenseConfig
from dinov2_core.eval.dense import confusion_matrix, dense_probe, mean_iou
from dinov2_core.eval.pca_maps import pca_rgb, write_pca_maps


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


def test_pca_png_is_written_with_the_right_size(tmp_path):
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 32, 48, generator=generator)
    patch_maps = torch.randn(2, 16, 4, 6, generator=generator)
    paths = write_pca_maps(images, patch_maps, str(tmp_path))
    assert [os.path.basename(p) for p in paths] == ["pca_000.png", "pca_001.png"]
    with Image.open(paths[0]) as panel:
        assert panel.size == (96, 32) and panel.mode == "RGB"
    colours = pca_rgb(patch_maps, foreground_threshold=0.5)
    assert colours.shape == (2, 4, 6, 3)
    assert 0.0 <= colours.min() and colours.max() <= 1.0
    assert (colours.sum(-1) == 0).any()  # background patches are black
