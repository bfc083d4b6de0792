"""DINOv2 multi-crop augmentation with torchvision v2 transforms (recipe §4.1).

One image → 2 global crops (shared by student and teacher) and ``local_crops_number`` local crops, each
with independently drawn parameters: bicubic RandomResizedCrop, horizontal flip (p=0.5), colour jitter
(brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1; p=0.8), grayscale (p=0.2), Gaussian blur
(kernel 9, σ ~ U(0.1, 2.0)), solarize (threshold 128, p=0.2, second global crop only), then ImageNet
normalisation.

Gaussian-blur probabilities (global 1 / global 2 / local):

* ``blur_mode="released"`` (default): 0.0 / 0.9 / 0.5 — what the official code *actually* applies (its
  blur wrapper passes 1−p to ``RandomApply``), hence what the released checkpoints were trained with.
* ``blur_mode="configured"``: 1.0 / 0.1 / 0.5 — the values written in the official configs.
* ``blur_mode="none"``: no blur, for small images (a 9-pixel kernel with σ up to 2 erases a 32 px crop).

``__call__(image, seed=...)`` makes one sample's augmentation a pure function of the seed (the global
torch RNG is forked and restored), which the trainer uses for deterministic, resumable data.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torchvision.transforms import v2

from dinov2_core.utils.config import ConfigError

BlurMode = Literal["released", "configured", "none"]

BLUR_PROBABILITIES: dict[str, tuple[float, float, float]] = {
    "released": (0.0, 0.9, 0.5),
    "configured": (1.0, 0.1, 0.5),
    "none": (0.0, 0.0, 0.0),
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BLUR_KERNEL_SIZE = 9
SOLARIZE_THRESHOLD = 128


def _check_scale(name: str, scale: tuple[float, float]) -> tuple[float, float]:
    low, high = (float(v) for v in scale)
    if not 0.0 < low <= high <= 1.0:
        raise ConfigError(f"{name}: {tuple(scale)!r} must satisfy 0 < min <= max <= 1")
    return low, high


def check_crop_arguments(local_crops_number: int, global_crops_size: int, local_crops_size: int,
                         blur_mode: str, blur_sigma: tuple[float, float]) -> None:
    """Reject invalid multi-crop settings with a ConfigError naming the key (shared by both backends)."""
    if blur_mode not in BLUR_PROBABILITIES:
        raise ConfigError(f"blur_mode: {blur_mode!r} is not one of {list(BLUR_PROBABILITIES)}")
    if local_crops_number < 0:
        raise ConfigError(f"local_crops_number: {local_crops_number!r} must be >= 0")
    for name, size in (("global_crops_size", global_crops_size), ("local_crops_size", local_crops_size)):
        if size <= 0:
            raise ConfigError(f"{name}: {size!r} must be > 0")
    if not 0.0 < blur_sigma[0] <= blur_sigma[1]:
        raise ConfigError(f"blur_sigma: {tuple(blur_sigma)!r} must satisfy 0 < min <= max")


class DataAugmentationDINO:
    """Callable ``(PIL image, seed=None) -> {"global_crops", "global_crops_teacher", "local_crops", "offsets"}``.

    Crops are float32 (3, size, size) tensors, normalised with the ImageNet mean/std.
    """

    def __init__(
        self,
        global_crops_scale: tuple[float, float] = (0.32, 1.0),
        local_crops_scale: tuple[float, float] = (0.05, 0.32),
        local_crops_number: int = 8,
        global_crops_size: int = 224,
        local_crops_size: int = 96,
        blur_mode: BlurMode = "released",
        blur_sigma: tuple[float, float] = (0.1, 2.0),
    ) -> None:
        check_crop_arguments(local_crops_number, global_crops_size, local_crops_size, blur_mode, blur_sigma)
        self.global_crops_scale = _check_scale("global_crops_scale", global_crops_scale)
        self.local_crops_scale = _check_scale("local_crops_scale", local_crops_scale)
        self.local_crops_number = local_crops_number
        self.global_crops_size = global_crops_size
        self.local_crops_size = local_crops_size
        self.blur_mode = blur_mode
        self.blur_probabilities = BLUR_PROBABILITIES[blur_mode]
        blur_global1, blur_global2, blur_local = self.blur_probabilities

        def geometric(size: int, scale: tuple[float, float]) -> v2.Transform:
            return v2.Compose(
                [
                    v2.RandomResizedCrop(size, scale=scale, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                    v2.RandomHorizontalFlip(p=0.5),
                ]
            )

        def blur(p: float) -> v2.Transform:
            return v2.RandomApply([v2.GaussianBlur(kernel_size=BLUR_KERNEL_SIZE, sigma=blur_sigma)], p=p)

        color = [
            v2.RandomApply([v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
        ]
        to_normalized_tensor = [
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
            v2.ToPureTensor(),
        ]
        self.geometric_global = geometric(global_crops_size, self.global_crops_scale)
        self.geometric_local = geometric(local_crops_size, self.local_crops_scale)
        self.global1_transform = v2.Compose([*color, blur(blur_global1), *to_normalized_tensor])
        self.global2_transform = v2.Compose(
            [*color, blur(blur_global2), v2.RandomSolarize(threshold=SOLARIZE_THRESHOLD, p=0.2), *to_normalized_tensor]
        )
        self.local_transform = v2.Compose([*color, blur(blur_local), *to_normalized_tensor])

    def _augment(self, image: Any) -> dict[str, Any]:
        global_crops = [
            self.global1_transform(self.geometric_global(image)),
            self.global2_transform(self.geometric_global(image)),
        ]
        local_crops = [self.local_transform(self.geometric_local(image)) for _ in range(self.local_crops_number)]
        return {
            "global_crops": global_crops,
            "global_crops_teacher": global_crops,
            "local_crops": local_crops,
            "offsets": (),
        }

    def __call__(self, image: Any, seed: int | None = None) -> dict[str, Any]:
        if seed is None:
            return self._augment(image)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self._augment(image)
