"""Multi-crop augmentation: output contract, seeded determinism, blur probabilities measured from pixels
(released 0/0.9/0.5 vs configured 1/0.1/0.5), validation, and (``official``) parity with the official
torchvision-v1 pipeline under the same torch seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dinov2_core.data.augmentations import IMAGENET_STD, DataAugmentationDINO
from dinov2_core.utils.config import ConfigError


@pytest.fixture(autouse=True)
def _single_thread():
    # Tiny convolutions (the blur) are dominated by thread start-up on a shared 2-core machine.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def noise_image() -> Image.Image:
    return Image.fromarray(np.random.RandomState(0).randint(0, 256, (96, 96, 3), dtype=np.uint8))


def _tiny(**kwargs) -> DataAugmentationDINO:
    return DataAugmentationDINO(global_crops_size=32, local_crops_size=16, **kwargs)


def test_output_contract(noise_image):
    out = _tiny(local_crops_number=3)(noise_image, seed=0)
    assert set(out) == {"global_crops", "global_crops_teacher", "local_crops", "offsets"}
    assert [tuple(c.shape) for c in out["global_crops"]] == [(3, 32, 32)] * 2
    assert [tuple(c.shape) for c in out["local_crops"]] == [(3, 16, 16)] * 3
    assert out["global_crops_teacher"] is out["global_crops"] and out["offsets"] == ()
    crop = out["global_crops"][0]
    assert type(crop) is torch.Tensor and crop.dtype == torch.float32
    # ImageNet normalisation maps [0, 1] into roughly [-2.12, 2.64].
    assert crop.min() >= -2.2 and crop.max() <= 2.7


def test_seed_makes_a_sample_reproducible_and_leaves_global_rng_alone(noise_image):
    aug = _tiny(local_crops_number=2)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    first = aug(noise_image, seed=42)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(999)
    second = aug(noise_image, seed=42)
    other = aug(noise_image, seed=43)
    for a, b in zip(first["global_crops"] + first["local_crops"], second["global_crops"] + second["local_crops"]):
        assert torch.equal(a, b)
    assert not torch.equal(first["global_crops"][0], other["global_crops"][0])


def _roughness(crop: torch.Tensor) -> float:
    """Mean |horizontal gradient| / std per channel: ≈1.1 for (resampled) white noise, ≈0.25 once blurred."""
    gradient = (crop[:, :, 1:] - crop[:, :, :-1]).abs().mean(dim=(1, 2))
    return (gradient / (crop.std(dim=(1, 2)) + 1e-6)).mean().item()


@pytest.mark.parametrize("mode, expected", [("released", (0.0, 0.9, 0.5)), ("configured", (1.0, 0.1, 0.5)),
                                            ("none", (0.0, 0.0, 0.0))])
def test_blur_rates_per_view(noise_image, mode, expected):
    # σ fixed at 2 so every applied blur is visible in the pixels; the probabilities are the real ones.
    aug = _tiny(local_crops_number=4, blur_mode=mode, blur_sigma=(2.0, 2.0))
    n = 200
    blurred = np.zeros(3)
    for seed in range(n):
        out = aug(noise_image, seed=seed)
        blurred[0] += _roughness(out["global_crops"][0]) < 0.6
        blurred[1] += _roughness(out["global_crops"][1]) < 0.6
        blurred[2] += sum(_roughness(c) < 0.6 for c in out["local_crops"]) / 4
    rates = blurred / n
    # 4-sigma binomial tolerances (global: n=200, local: 800 crops).
    for rate, p, trials in zip(rates, expected, (n, n, 4 * n)):
        tolerance = 4 * np.sqrt(p * (1 - p) / trials) + 1e-9
        assert abs(rate - p) <= tolerance, (mode, rates)


def test_invalid_arguments_name_the_key():
    with pytest.raises(ConfigError, match="blur_mode.*released.*configured"):
        DataAugmentationDINO(blur_mode="fixed")
    with pytest.raises(ConfigError, match="global_crops_scale"):
        DataAugmentationDINO(global_crops_scale=(0.5, 0.2))
    with pytest.raises(ConfigError, match="local_crops_number"):
        DataAugmentationDINO(local_crops_number=-1)


@pytest.mark.official
def test_official_parity_released_mode_matches_v1_pipeline():
    official = pytest.importorskip("dinov2.data.augmentations")
    image = Image.fromarray(np.random.RandomState(1).randint(0, 256, (300, 400, 3), dtype=np.uint8))
    ours = DataAugmentationDINO(local_crops_number=2)
    theirs = official.DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), 2)
    one_level = 1 / 255 / min(IMAGENET_STD) + 1e-5
    for seed in range(4):
        mine = ours(image, seed=seed)
        torch.manual_seed(seed)
        ref = theirs(image)
        for a, b in zip(mine["global_crops"] + mine["local_crops"], ref["global_crops"] + ref["local_crops"]):
            # Same random parameters for every op; v1 and v2 may round an isolated pixel differently
            # when converting back to uint8 (measured: at most 2 pixels per crop, one level).
            difference = (a - b).abs()
            assert difference.max().item() <= one_level
            assert (difference > 1e-5).float().mean().item() < 1e-3
