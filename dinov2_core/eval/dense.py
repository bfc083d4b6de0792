"""Dense linear probe: a 1×1 linear head on frozen patch tokens, scored by mIoU on held-out images.

Patch features (N, D, h, w) are standardised per channel with train statistics (an affine map, so
the probe stays linear), mapped to class logits by a 1×1 convolution, upsampled bilinearly to the
mask resolution and trained with pixel-wise cross-entropy (Adam). Pixels equal to ``ignore_index``
count in neither the loss nor the metric. mIoU averages the IoU of every class that occurs in the
held-out ground truth or predictions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dinov2_core.eval.config import DenseConfig
from dinov2_core.eval.datasets import split_indices


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    valid = target != ignore_index
    index = target[valid] * num_classes + pred[valid]
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def mean_iou(confusion: torch.Tensor) -> tuple[float, list[float]]:
    """mIoU over classes present in ground truth or prediction, and the per-class IoU (nan if absent)."""
    confusion = confusion.double()
    intersection = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - intersection
    iou = torch.where(union > 0, intersection / union.clamp(min=1), torch.full_like(union, float("nan")))
    present = union > 0
    return float(iou[present].mean()), [float(v) for v in iou]


class DenseLinearHead(nn.Module):
    def __init__(self, mean: torch.Tensor, std: torch.Tensor, num_classes: int):
        super().__init__()
        self.register_buffer("mean", mean.view(1, -1, 1, 1))
        self.register_buffer("std", std.view(1, -1, 1, 1))
        self.classifier = nn.Conv2d(mean.numel(), num_classes, kernel_size=1)

    def forward(self, patch_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        logits = self.classifier((patch_map - self.mean) / self.std)
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def dense_probe(
    patch_maps: torch.Tensor,
    masks: torch.Tensor,
    cfg: DenseConfig,
    device: torch.device | str = "cpu",
) -> dict:
    """Train on a seeded split of the images, report ``miou``, ``pixel_acc`` and ``iou_per_class``."""
    if patch_maps.shape[0] < 2:
        raise ValueError("dense probe: needs at least two images with masks")
    valid_labels = masks[masks != cfg.ignore_index]
    num_classes = int(valid_labels.max()) + 1
    train_idx, held_idx = split_indices(patch_maps.shape[0], cfg.holdout_fraction, cfg.seed)
    train_x = patch_maps[torch.from_numpy(train_idx)].to(device)
    train_y = masks[torch.from_numpy(train_idx)].to(device)
    held_x = patch_maps[torch.from_numpy(held_idx)].to(device)
    held_y = masks[torch.from_numpy(held_idx)].to(device)
    mean = train_x.mean(dim=(0, 2, 3))
    std = train_x.std(dim=(0, 2, 3)).clamp(min=1e-6)
    torch.manual_seed(cfg.seed)
    head = DenseLinearHead(mean, std, num_classes).to(device)
    optimizer = torch.optim.Adam(head.parameters(), lr=cfg.lr)
    generator = torch.Generator().manual_seed(cfg.seed)
    size = tuple(masks.shape[-2:])
    for _ in range(cfg.iterations):
        batch = torch.randint(0, train_x.shape[0], (min(cfg.batch_size, train_x.shape[0]),), generator=generator)
        batch = batch.to(device)
        loss = F.cross_entropy(head(train_x[batch], size), train_y[batch], ignore_index=cfg.ignore_index)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        pred = head(held_x, size).argmax(dim=1)
    confusion = confusion_matrix(pred.cpu(), held_y.cpu(), num_classes, cfg.ignore_index)
    miou, per_class = mean_iou(confusion)
    return {
        "miou": miou,
        "pixel_acc": float(confusion.diag().sum() / confusion.sum().clamp(min=1)),
        "iou_per_class": per_class,
        "num_train_images": int(train_x.shape[0]),
        "num_heldout_images": int(held_x.shape[0]),
    }
