"""The small-image recipe gives the student a learning signal from the first step.

With the paper's LayerScale init (1e-5) every block is almost the identity at init, so the teacher's
cls token is the same vector for every image; Sinkhorn-Knopp (or centering) then turns identical rows
into exactly uniform targets (centering gives every image the same target, uniform once the center has
caught up). The targets then carry no information about the image, and a short run collapses to uniform
predictions (DINO loss stuck at ln K, seen on CIFAR-10). ``configs/train/cifar_vit_test.yaml`` must not
start there.
"""

from __future__ import annotations

import math

import pytest
import torch

from dinov2_core.train import load_train_config
from dinov2_core.train.data_loading import build_train_loader
from dinov2_core.train.meta_arch import SSLMetaArch, normalized_entropy

CIFAR_RECIPE = "configs/train/cifar_vit_test.yaml"


def teacher_targets_at_init(dataset_uri: str, overrides: list[str]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(DINO targets, teacher cls tokens, K) of a freshly built model on one real training batch."""
    cfg = load_train_config(CIFAR_RECIPE, [f"train.dataset={dataset_uri}", "train.batch_size_per_gpu=16",
                                           "train.num_workers=0", "parallel.device=cpu", *overrides])
    torch.manual_seed(cfg.train.seed)
    meta = SSLMetaArch(cfg)
    batch = next(iter(build_train_loader(cfg, 0, 1, 0, torch.float32)))
    with torch.no_grad():
        cls_tokens = meta.teacher["backbone"](batch["collated_global_crops"])
    targets, _ = meta.teacher_targets(batch, cfg.teacher.warmup_teacher_temp)
    return targets, cls_tokens, cfg.dino.head_n_prototypes


def mean_entropy(probabilities: torch.Tensor) -> float:
    return float(-(probabilities * probabilities.clamp_min(1e-30).log()).sum(-1).mean())


def spread_between_images(targets: torch.Tensor) -> float:
    """Mean total-variation distance of each image's target from the batch-mean target (0: all equal)."""
    return float(0.5 * (targets - targets.mean(dim=0)).abs().sum(dim=1).mean())


def test_cifar_recipe_teacher_targets_differ_between_images_at_init(tiny_dataset):
    targets, cls_tokens, k = teacher_targets_at_init(tiny_dataset.manifest_uri, [])
    assert cls_tokens.std(dim=0).mean() > 0.1  # images map to different cls tokens
    assert mean_entropy(targets) < 0.95 * math.log(k)  # the targets are not uniform
    assert spread_between_images(targets) > 0.3  # and they depend on the image
    assert targets.argmax(dim=1).unique().numel() > 1


@pytest.mark.parametrize("centering", ["sinkhorn_knopp", "centering"])
def test_paper_layerscale_init_gives_uniform_targets_on_a_fresh_model(tiny_dataset, centering):
    """The failure mode the recipe avoids (guards the explanation in docs/training.md)."""
    targets, cls_tokens, k = teacher_targets_at_init(tiny_dataset.manifest_uri,
                                                     ["student.layerscale=1.0e-5", f"train.centering={centering}"])
    assert cls_tokens.std(dim=0).mean() < 1e-2
    assert spread_between_images(targets) < 0.05
    if centering == "sinkhorn_knopp":  # identical rows balanced over the prototypes: exactly uniform
        assert mean_entropy(targets) > 0.99 * math.log(k)


def test_logged_target_entropy_is_zero_for_one_hot_and_one_for_uniform():
    k = 64
    assert normalized_entropy(torch.full((5, k), 1.0 / k)).item() == pytest.approx(1.0)
    assert normalized_entropy(torch.eye(k)[:5]).item() == pytest.approx(0.0, abs=1e-6)
    assert 0.0 < normalized_entropy(torch.softmax(torch.randn(5, k), dim=-1)).item() < 1.0
