"""DINOv2 multi-crop augmentation for a whole batch at once (vectorised over samples, CPU or GPU).

The same recipe and parameters as :class:`~dinov2_core.data.augmentations.DataAugmentationDINO`
(2 global crops + ``local_crops_number`` local crops; flip 0.5; ColorJitter(0.4, 0.4, 0.2, 0.1) with
p=0.8 in a random order; grayscale 0.2; Gaussian blur with the per-view probabilities of
``blur_mode``; solarize 0.2 on the second global crop only; ImageNet normalisation), but every op runs
on a batch of uint8 tensors with independent per-sample parameters drawn from one ``torch.Generator``,
so the cost per image is a small fraction of the per-image PIL pipeline's Python and dispatch overhead.
It is meant for small images (CIFAR-sized pretraining, where per-image transforms dominate a CPU data
worker) and for feeding a GPU, where the same calls run on the device.

Differences from the per-image path (statistically the same recipe, not bit-identical):

* crop + resize uses ``torchvision.ops.roi_align`` — bilinear, averaging ⌈crop/output⌉² source
  samples per output pixel (area-like antialiasing when downscaling) — instead of bicubic resampling;
* all inputs of a call must share one size (the trainer resizes and centre-crops every image to
  ``crops.batched_source_size`` first), so the crops see that square, not the original aspect ratio;
* pixels stay float32 between ops instead of being rounded to uint8 after each PIL op.

``__call__(images, generator)`` returns the crop-major collated tensors of
:func:`dinov2_core.data.collate.collate_data_and_cast` (``[crop 0 of every image; crop 1 …]``); the
output is a pure function of the images and the generator's state.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align

from dinov2_core.data.augmentations import (
    BLUR_KERNEL_SIZE,
    BLUR_PROBABILITIES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SOLARIZE_THRESHOLD,
    BlurMode,
    _check_scale,
    check_crop_arguments,
)

_RATIO = (3.0 / 4.0, 4.0 / 3.0)
_CROP_ATTEMPTS = 10
_FLIP_P = 0.5
_JITTER_P = 0.8
_BRIGHTNESS, _CONTRAST, _SATURATION, _HUE = 0.4, 0.4, 0.2, 0.1
_GRAYSCALE_P = 0.2
_SOLARIZE_P = 0.2
# ITU-R 601-2 luma, the weights PIL and torchvision use for grayscale.
_LUMA = (0.299, 0.587, 0.114)


def _uniform(shape: tuple[int, ...], low: float, high: float, generator: torch.Generator, device: torch.device) -> Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator, device=device)


def sample_crop_boxes(n: int, height: int, width: int, scale: tuple[float, float], generator: torch.Generator,
                      device: torch.device | str = "cpu") -> Tensor:
    """``n`` RandomResizedCrop boxes ``(x0, y0, x1, y1)`` in integer pixels, torchvision's sampling rule.

    Per box: up to 10 attempts of (area ~ U(scale)·H·W, log-ratio ~ U(log 3/4, log 4/3)), the first that
    fits wins and is placed uniformly; if none fits, the central crop clamped to the ratio range.
    """
    device = torch.device(device)
    area = float(height * width)
    target_area = area * _uniform((n, _CROP_ATTEMPTS), *scale, generator, device)
    ratio = torch.exp(_uniform((n, _CROP_ATTEMPTS), math.log(_RATIO[0]), math.log(_RATIO[1]), generator, device))
    w = torch.round(torch.sqrt(target_area * ratio))
    h = torch.round(torch.sqrt(target_area / ratio))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    # argmax over a bool picks the first True attempt (0 when none, handled by the fallback below).
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)
    found = fits.any(dim=1)
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)

    in_ratio = width / height
    if in_ratio < _RATIO[0]:
        fallback_w, fallback_h = width, round(width / _RATIO[0])
    elif in_ratio > _RATIO[1]:
        fallback_w, fallback_h = round(height * _RATIO[1]), height
    else:
        fallback_w, fallback_h = width, height
    w = torch.where(found, w, torch.full_like(w, fallback_w))
    h = torch.where(found, h, torch.full_like(h, fallback_h))
    # Uniform integer offsets in [0, W - w] (always drawn, so the RNG stream does not depend on `found`).
    offsets = torch.rand((n, 2), generator=generator, device=device)
    x0 = torch.floor(offsets[:, 0] * (width - w + 1)).clamp(max=width - w)
    y0 = torch.floor(offsets[:, 1] * (height - h + 1)).clamp(max=height - h)
    x0 = torch.where(found, x0, torch.div(width - w, 2, rounding_mode="floor"))
    y0 = torch.where(found, y0, torch.div(height - h, 2, rounding_mode="floor"))
    return torch.stack([x0, y0, x0 + w, y0 + h], dim=1)


def resized_crops(images: Tensor, boxes: Tensor, image_index: Tensor, size: int) -> Tensor:
    """Crop ``boxes`` (x0, y0, x1, y1 pixels) out of ``images[image_index]`` and resize each to size×size.

    Bilinear; when a box is larger than the output, each output pixel averages ⌈box/size⌉² samples
    spread over the source pixels it covers (antialiasing). When upscaling, the outermost output pixels
    interpolate with the source pixels just outside the box (where a crop-then-resize replicates the edge).
    """
    rois = torch.cat([image_index.to(boxes.dtype).unsqueeze(1), boxes], dim=1)
    # aligned=True puts pixel centres at integer+0.5, so box [x0, x1) covers exactly pixels x0…x1−1;
    # sampling_ratio=-1 chooses the per-box sample count ⌈box/size⌉ per axis described above.
    return roi_align(images, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)


def _rows(mask: Tensor) -> Tensor:
    """Indices of the True entries of a per-sample mask."""
    return mask.nonzero().squeeze(1)


def _grayscale(x: Tensor) -> Tensor:
    """(M, 3, H, W) → (M, 1, H, W) luma."""
    r, g, b = x.unbind(dim=1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def _blend(x: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    """factor·x + (1 − factor)·other, clamped to [0, 1] as torchvision does after every jitter op."""
    factor = factor.view(-1, 1, 1, 1)
    return (factor * x + (1 - factor) * other).clamp_(0.0, 1.0)


def _adjust_brightness(x: Tensor, factor: Tensor) -> Tensor:
    return (x * factor.view(-1, 1, 1, 1)).clamp_(0.0, 1.0)


def _adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    return _blend(x, _grayscale(x).mean(dim=(1, 2, 3), keepdim=True), factor)


def _adjust_saturation(x: Tensor, factor: Tensor) -> Tensor:
    return _blend(x, _grayscale(x), factor)


def _adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate the HSV hue by ``shift`` (fraction of a turn) per sample."""
    value, channel = x.max(dim=1)
    chroma = value - x.min(dim=1).values
    # Grey pixels (chroma 0) have r = g = b, so every numerator below is 0 and any hue gives back V.
    inverse_chroma = chroma.clamp_min(1e-12).reciprocal_()
    r, g, b = x.unbind(dim=1)
    # Hue in sextants [0, 6): which formula applies depends on the channel holding the maximum.
    hue = torch.where(channel == 0, (g - b).mul_(inverse_chroma),
                      torch.where(channel == 1, (b - r).mul_(inverse_chroma).add_(2),
                                  (r - g).mul_(inverse_chroma).add_(4)))
    hue = hue.add_(6 * shift.view(-1, 1, 1)).remainder_(6)
    # Back to RGB with the closed form channel_n = V − C·clamp(min(k, 4 − k), 0, 1), k = (n + hue) mod 6.
    n = torch.tensor([5.0, 3.0, 1.0], device=x.device).view(1, 3, 1, 1)
    k = (n + hue.unsqueeze(1)).remainder_(6)
    return value.unsqueeze(1) - chroma.unsqueeze(1) * torch.minimum(k, 4 - k).clamp_(0.0, 1.0)


def _gaussian_blur(x: Tensor, sigma: Tensor) -> Tensor:
    """Separable Gaussian blur, kernel ``BLUR_KERNEL_SIZE``, one σ per sample, reflect padding."""
    m, c, height, width = x.shape
    if m == 0:  # a conv with zero groups is an error, and there is nothing to blur
        return x
    half = BLUR_KERNEL_SIZE // 2
    taps = torch.arange(-half, half + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (taps / sigma.view(-1, 1)) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (m·c, K)
    # Every (sample, channel) plane is its own group, so one grouped conv applies m different kernels.
    planes = F.pad(x.reshape(1, m * c, height, width), (half, half, half, half), mode="reflect")
    planes = F.conv2d(planes, kernel.view(m * c, 1, 1, BLUR_KERNEL_SIZE), groups=m * c)
    planes = F.conv2d(planes, kernel.view(m * c, 1, BLUR_KERNEL_SIZE, 1), groups=m * c)
    return planes.view(m, c, height, width)


class BatchedDataAugmentationDINO:
    """Callable ``(uint8 images (N, 3, H, W), generator) -> {"collated_global_crops", "collated_local_crops"}``.

    ``collated_global_crops`` is (2N, 3, G, G) and ``collated_local_crops`` (L·N, 3, l, l), float32,
    crop-major, normalised with the ImageNet mean/std; with L = 0 the local tensor is (0, 3, 0, 0) like
    the per-image collate. Runs on the device of ``images`` (the generator must live there too).
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
        self.blur_sigma = (float(blur_sigma[0]), float(blur_sigma[1]))
        self.blur_probabilities = BLUR_PROBABILITIES[blur_mode]

    def __call__(self, images: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images: expected a uint8 (N, 3, H, W) tensor, got {images.dtype} {tuple(images.shape)}")
        n = images.shape[0]
        source = images.float().div_(255.0)
        blur_global1, blur_global2, blur_local = self.blur_probabilities
        # Rows n·v … n·(v+1)−1 hold view v of every image (crop-major), so per-row probabilities are
        # per-view constants repeated n times.
        global_rows = torch.arange(2, device=images.device).repeat_interleave(n)
        global_crops = self._views(
            source, 2, self.global_crops_scale, self.global_crops_size, generator,
            blur_p=torch.tensor([blur_global1, blur_global2], device=images.device)[global_rows],
            solarize_p=torch.tensor([0.0, _SOLARIZE_P], device=images.device)[global_rows],
        )
        if self.local_crops_number == 0:
            local_crops = torch.empty((0, 3, 0, 0), dtype=torch.float32, device=images.device)
        else:
            rows = self.local_crops_number * n
            local_crops = self._views(
                source, self.local_crops_number, self.local_crops_scale, self.local_crops_size, generator,
                blur_p=torch.full((rows,), blur_local, device=images.device),
                solarize_p=torch.zeros(rows, device=images.device),
            )
        return {"collated_global_crops": global_crops, "collated_local_crops": local_crops}

    def _views(self, source: Tensor, n_views: int, scale: tuple[float, float], size: int, generator: torch.Generator,
               blur_p: Tensor, solarize_p: Tensor) -> Tensor:
        n, _, height, width = source.shape
        m = n_views * n
        device = source.device
        boxes = sample_crop_boxes(m, height, width, scale, generator, device)
        x = resized_crops(source, boxes, torch.arange(m, device=device).remainder(n), size)

        # Each random op is computed only on the rows that draw it (index, op, write back).
        flip = _rows(torch.rand(m, generator=generator, device=device) < _FLIP_P)
        x[flip] = x[flip].flip(-1)
        x = self._color_jitter(x, generator)
        gray = _rows(torch.rand(m, generator=generator, device=device) < _GRAYSCALE_P)
        x[gray] = _grayscale(x[gray]).expand(-1, 3, -1, -1)
        sigma = _uniform((m,), *self.blur_sigma, generator, device)
        blur = _rows(torch.rand(m, generator=generator, device=device) < blur_p)
        x[blur] = _gaussian_blur(x[blur], sigma[blur])
        solarize = _rows(torch.rand(m, generator=generator, device=device) < solarize_p)
        chosen = x[solarize]
        x[solarize] = torch.where(chosen >= SOLARIZE_THRESHOLD / 255.0, 1.0 - chosen, chosen)

        mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
        return x.sub_(mean).div_(std)

    def _color_jitter(self, x: Tensor, generator: torch.Generator) -> Tensor:
        m = x.shape[0]
        device = x.device
        apply = torch.rand(m, generator=generator, device=device) < _JITTER_P
        factors = [
            _uniform((m,), 1 - _BRIGHTNESS, 1 + _BRIGHTNESS, generator, device),
            _uniform((m,), 1 - _CONTRAST, 1 + _CONTRAST, generator, device),
            _uniform((m,), 1 - _SATURATION, 1 + _SATURATION, generator, device),
            _uniform((m,), -_HUE, _HUE, generator, device),
        ]
        ops = (_adjust_brightness, _adjust_contrast, _adjust_saturation, _adjust_hue)
        # A random permutation of the four ops per sample (argsort of uniform noise).
        order = torch.rand((m, 4), generator=generator, device=device).argsort(dim=1)
        # Step k applies, to each sample, the op in position k of its order: per op, only the rows that
        # need it are computed, so the cost is one op per sample per step.
        for step in range(4):
            for op_index, op in enumerate(ops):
                rows = _rows(apply & (order[:, step] == op_index))
                x[rows] = op(x[rows], factors[op_index][rows])
        return x
