"""Batched multi-crop augmentation: output contract and crop-major order, generator determinism, the
per-view rates of every random op measured from pixels, RandomResizedCrop boxes, statistics against the
per-image pipeline, and the trainer's ``crops.augmentation=batched`` data path (skipped images, exact
restart, a short training run that exports)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from dinov2_core.data.augmentations import IMAGENET_MEAN, IMAGENET_STD, DataAugmentationDINO
from dinov2_core.data.batched_augmentations import BatchedDataAugmentationDINO, resized_crops, sample_crop_boxes
from dinov2_core.utils.config import ConfigError

TINY = "configs/train/tiny_pretrain.yaml"
MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


@pytest.fixture(autouse=True)
def _single_thread():
    # Small convolutions are dominated by thread start-up on a shared 2-core machine.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from dinov2_core.data.synthetic import make_classification_dataset

    return make_classification_dataset(tmp_path_factory.mktemp("batched_data"), num_classes=4, images_per_class=4,
                                       image_size=32, seed=0, corrupt_images=2)


def _tiny(**kwargs) -> BatchedDataAugmentationDINO:
    return BatchedDataAugmentationDINO(global_crops_size=32, local_crops_size=16, **kwargs)


def _noise(n: int, size: int = 96, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _pixels(crops: torch.Tensor) -> torch.Tensor:
    """Undo the ImageNet normalisation: back to [0, 1]."""
    return crops * STD + MEAN


def _run(aug: BatchedDataAugmentationDINO, images: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    return aug(images, torch.Generator().manual_seed(seed))


def test_output_contract_and_crop_major_order():
    # Image 0 is noise, image 1 a constant colour: every op keeps a constant image constant, so the
    # rows of image 1 are the ones with no spatial variation.
    images = torch.cat([_noise(1, 48), torch.full((1, 3, 48, 48), 90, dtype=torch.uint8)])
    out = _run(_tiny(local_crops_number=3, blur_mode="none"), images)
    assert set(out) == {"collated_global_crops", "collated_local_crops"}
    globals_, locals_ = out["collated_global_crops"], out["collated_local_crops"]
    assert globals_.shape == (4, 3, 32, 32) and locals_.shape == (6, 3, 16, 16)
    assert globals_.dtype == locals_.dtype == torch.float32
    assert globals_.min() >= -2.2 and globals_.max() <= 2.7
    for crops in (globals_, locals_):
        flat = crops.flatten(2).std(dim=2).mean(dim=1)
        assert (flat[0::2] > 0.1).all() and (flat[1::2] < 1e-4).all()
    assert _run(_tiny(local_crops_number=0), images)["collated_local_crops"].shape == (0, 3, 0, 0)


def test_same_generator_seed_same_crops_other_seed_other_crops():
    aug, images = _tiny(local_crops_number=2), _noise(4, 40)
    first, second, other = _run(aug, images, 7), _run(aug, images, 7), _run(aug, images, 8)
    for key in first:
        assert torch.equal(first[key], second[key])
        assert not torch.equal(first[key], other[key])


def test_rejects_non_uint8_batches_and_bad_arguments():
    with pytest.raises(ValueError, match="uint8"):
        _run(_tiny(), _noise(2).float())
    with pytest.raises(ConfigError, match="blur_mode.*released.*configured"):
        BatchedDataAugmentationDINO(blur_mode="fixed")
    with pytest.raises(ConfigError, match="global_crops_scale"):
        BatchedDataAugmentationDINO(global_crops_scale=(0.5, 0.2))
    with pytest.raises(ConfigError, match="local_crops_number"):
        BatchedDataAugmentationDINO(local_crops_number=-1)


def _roughness(crops: torch.Tensor) -> torch.Tensor:
    """Per crop: mean |horizontal gradient| / std per channel, ≈1 for resampled noise, ≈0.25 once blurred."""
    gradient = (crops[..., 1:] - crops[..., :-1]).abs().mean(dim=(2, 3))
    return (gradient / (crops.std(dim=(2, 3)) + 1e-6)).mean(dim=1)


def _check_rate(rate: float, p: float, trials: int) -> None:
    # 4-sigma binomial tolerance.
    assert abs(rate - p) <= 4 * math.sqrt(p * (1 - p) / trials) + 1e-9, (rate, p, trials)


@pytest.mark.parametrize("mode, expected", [("released", (0.0, 0.9, 0.5)), ("configured", (1.0, 0.1, 0.5)),
                                            ("none", (0.0, 0.0, 0.0))])
def test_blur_rates_per_view(mode, expected):
    # σ fixed at 2 so every applied blur is visible in the pixels; the probabilities are the real ones.
    n, locals_number = 200, 4
    out = _run(_tiny(local_crops_number=locals_number, blur_mode=mode, blur_sigma=(2.0, 2.0)), _noise(n))
    blurred_global = (_roughness(out["collated_global_crops"]) < 0.6).float()
    blurred_local = (_roughness(out["collated_local_crops"]) < 0.6).float()
    _check_rate(blurred_global[:n].mean().item(), expected[0], n)
    _check_rate(blurred_global[n:].mean().item(), expected[1], n)
    _check_rate(blurred_local.mean().item(), expected[2], locals_number * n)


def test_solarize_only_on_the_second_global_view():
    # A light grey image stays grey and ≥ 0.588 under any jitter (brightness ≥ 0.6); solarized, it is < 0.5.
    n = 400
    out = _run(_tiny(local_crops_number=2), torch.full((n, 3, 32, 32), 250, dtype=torch.uint8))
    solarized_global = (_pixels(out["collated_global_crops"]).mean(dim=(1, 2, 3)) < 0.5).float()
    assert solarized_global[:n].sum() == 0
    _check_rate(solarized_global[n:].mean().item(), 0.2, n)
    assert (_pixels(out["collated_local_crops"]).mean(dim=(1, 2, 3)) >= 0.5).all()


def test_flip_and_grayscale_rates():
    n = 400
    # A horizontal grey ramp: jitter and grayscale keep "right brighter than left" unless flipped
    # (no solarize on view 1, no blur with blur_mode=none).
    ramp = torch.linspace(0, 255, 32).round().to(torch.uint8).expand(n, 3, 32, 32).contiguous()
    out = _run(_tiny(local_crops_number=0, blur_mode="none", global_crops_scale=(1.0, 1.0)), ramp)
    view1 = out["collated_global_crops"][:n, 0]
    flipped = (view1[..., :16].mean(dim=(1, 2)) > view1[..., 16:].mean(dim=(1, 2))).float()
    _check_rate(flipped.mean().item(), 0.5, n)

    out = _run(_tiny(local_crops_number=2, blur_mode="none"), _noise(n, 48))
    gray = torch.cat([((c[:, 0] - c[:, 1]).abs().amax(dim=(1, 2)) < 1e-5).float()
                      for c in (_pixels(out["collated_global_crops"]), _pixels(out["collated_local_crops"]))])
    _check_rate(gray.mean().item(), 0.2, 4 * n)


def test_crop_boxes_follow_torchvision_rule():
    generator = torch.Generator().manual_seed(0)
    height, width, scale = 60, 80, (0.05, 0.32)
    boxes = sample_crop_boxes(4000, height, width, scale, generator)
    x0, y0, x1, y1 = boxes.unbind(1)
    w, h = x1 - x0, y1 - y0
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= width).all() and (y1 <= height).all()
    assert (boxes == boxes.round()).all() and (w > 0).all() and (h > 0).all()
    area = w * h / (height * width)
    # Rounding w and h to integers moves the area by at most about one row and one column.
    slack = (w + h + 1) / (height * width)
    assert (area >= scale[0] - slack).all() and (area <= scale[1] + slack).all()
    ratio = w / h
    assert (ratio > 0.7).all() and (ratio < 1.45).all()
    # Same distribution as torchvision's sampler: compare the mean area fraction and the spread of offsets.
    torch.manual_seed(0)
    reference = torch.tensor([v2.RandomResizedCrop.get_params(torch.empty(3, height, width), list(scale),
                                                              [3 / 4, 4 / 3])[2:] for _ in range(4000)])
    reference_area = (reference[:, 0] * reference[:, 1] / (height * width)).float()
    assert abs(area.mean().item() - reference_area.mean().item()) < 0.01
    assert abs(x0.float().mean().item() / (width - w).float().mean().item() - 0.5) < 0.05

    # Nothing fits (area > 1 at every attempt): the central crop, clamped to the ratio range.
    wide = sample_crop_boxes(5, 10, 40, (1.0, 1.0), generator)
    assert torch.equal(wide, torch.tensor([[13.0, 0.0, 26.0, 10.0]]).expand(5, 4))


def test_resized_crops_cover_exactly_the_box_and_average_when_downscaling():
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    index = torch.tensor([0, 1])
    full = torch.tensor([[0.0, 0.0, 32.0, 32.0]]).expand(2, 4)
    assert torch.allclose(resized_crops(images, full, index, 32), images, atol=1e-6)
    assert torch.allclose(resized_crops(images, full, index, 16), F.avg_pool2d(images, 2), atol=1e-6)
    box = torch.tensor([[8.0, 4.0, 24.0, 28.0]]).expand(2, 4)
    assert torch.allclose(resized_crops(images, box, index, 8),
                          F.adaptive_avg_pool2d(images[:, :, 4:28, 8:24], 8), atol=1e-6)
    # Upscaling is bilinear: a horizontal ramp stays an increasing ramp; the outermost samples may
    # interpolate with the pixel just outside the box (real image content, not edge replication).
    ramp = torch.arange(32.0).expand(1, 3, 32, 32).contiguous()
    crop = resized_crops(ramp, torch.tensor([[10.0, 0.0, 14.0, 32.0]]), torch.tensor([0]), 16)[0, 0, 0]
    assert crop.min() >= 9.5 and crop.max() <= 13.5 and (crop[1:] >= crop[:-1]).all()


def test_statistics_match_the_per_image_pipeline(tiny_data):
    from dinov2_core.data.image_io import load_image
    from dinov2_core.data.manifest import read_manifest

    images = [load_image(r.uri) for r in read_manifest(tiny_data.manifest_uri) if "corrupt" not in r.uri]
    kwargs = dict(local_crops_number=2, global_crops_size=32, local_crops_size=16)
    per_image = DataAugmentationDINO(**kwargs)
    repeats = 8
    reference = {"global": [], "local": []}
    for seed in range(repeats):
        for index, image in enumerate(images):
            out = per_image(image, seed=seed * 100 + index)
            reference["global"] += out["global_crops"]
            reference["local"] += out["local_crops"]
    batch = torch.stack([v2.functional.pil_to_tensor(image) for image in images])
    batched = BatchedDataAugmentationDINO(**kwargs)
    outs = [_run(batched, batch, seed) for seed in range(repeats)]
    ours = {"global": torch.cat([o["collated_global_crops"] for o in outs]),
            "local": torch.cat([o["collated_local_crops"] for o in outs])}
    for view in ("global", "local"):
        theirs = torch.stack(reference[view])
        for stat in (lambda t: t.mean(dim=(0, 2, 3)), lambda t: t.std(dim=(0, 2, 3)),
                     lambda t: t.std(dim=(2, 3)).mean(dim=0)):
            assert torch.allclose(stat(ours[view]), stat(theirs), atol=0.12), (view, stat(ours[view]), stat(theirs))


def _cfg(manifest: str, *overrides: str):
    from dinov2_core.train import load_train_config

    return load_train_config(TINY, [f"train.dataset={manifest}", "crops.augmentation=batched", *overrides])


def test_config_keys_are_validated():
    from dinov2_core.train import load_train_config

    with pytest.raises(ConfigError, match=r"crops.augmentation: 'fast' is not one of \['per_image', 'batched'\]"):
        load_train_config(TINY, ["train.dataset=x.txt", "crops.augmentation=fast"])
    with pytest.raises(ConfigError, match="crops.batched_source_size"):
        load_train_config(TINY, ["train.dataset=x.txt", "crops.batched_source_size=0"])
    assert _cfg("x.txt").crops.batched_source_size is None


def _batches(cfg, start: int, count: int) -> list[dict]:
    from dinov2_core.train.data_loading import build_train_loader

    iterator = iter(build_train_loader(cfg, 0, 1, start, torch.float32))
    return [next(iterator) for _ in range(count)]


def _assert_same_batch(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]) if isinstance(a[key], torch.Tensor) else a[key] == b[key], key


def test_loader_skips_corrupt_images_and_matches_the_per_image_batch_layout(tiny_data):
    size = 18  # 16 images + 2 corrupt ones: one batch covers the first pass exactly once
    batched = _batches(_cfg(tiny_data.manifest_uri, f"train.batch_size_per_gpu={size}"), 0, 1)[0]
    per_image = _batches(_cfg(tiny_data.manifest_uri, f"train.batch_size_per_gpu={size}",
                              "crops.augmentation=per_image"), 0, 1)[0]
    assert batched["n_skipped"] == per_image["n_skipped"] == 2
    assert set(batched) == set(per_image)
    for key, value in per_image.items():
        if isinstance(value, torch.Tensor):
            assert batched[key].shape == value.shape and batched[key].dtype == value.dtype, key
    assert torch.equal(batched["stream_positions"], per_image["stream_positions"])
    # Masks do not depend on the augmentation backend (same RNG, same seed).
    assert torch.equal(batched["collated_masks"], per_image["collated_masks"])


def test_loader_restarts_exactly_at_a_stream_position(tiny_data):
    cfg = _cfg(tiny_data.manifest_uri, "crops.batched_source_size=24")
    batch_size = cfg.train.batch_size_per_gpu
    from_zero = _batches(cfg, 0, 3)
    _assert_same_batch(from_zero[0], _batches(cfg, 0, 1)[0])
    restarted = _batches(cfg, 2 * batch_size, 1)[0]
    _assert_same_batch(from_zero[2], restarted)
    assert not torch.equal(from_zero[0]["collated_global_crops"], from_zero[1]["collated_global_crops"])


def test_training_runs_and_exports_with_batched_augmentation(tiny_data, tmp_path):
    from dinov2_core.train import run_training

    summary = run_training(_cfg(tiny_data.manifest_uri, "optim.epochs=1"), tmp_path / "run")
    assert summary["iteration"] == 4
    assert (tmp_path / "run" / "export" / "backbone.pth").exists()
