"""Frozen-feature extraction: decode images (skip and count corrupt ones), transform, run a backbone once.

One pass of :func:`extract_features` yields everything the protocols need:

* ``cls``          (N, D)      final-norm cls token (= the backbone's ``forward``), kNN / logreg / retrieval
* ``cls_blocks``   (N, n, D)   normed cls tokens of the last ``n`` blocks, oldest first (linear grid)
* ``patch_mean``   (N, D)      mean of the last block's normed patch tokens (linear "avgpool")
* ``patch_map``    (N, D, h, w) last block's normed patch tokens (dense probe, PCA), only on request
* ``mask``         (N, H, W)   per-pixel labels transformed like the image, when masks are given

The raw-pixel baseline uses the same loop with :class:`PixelFeatures` as the "model".
"""

from __future__ import annotations

import hashlib
import io
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision import tv_tensors
from torchvision.transforms import v2

from dinov2_core.data.image_io import ImageDecodeError, decode_image
from dinov2_core.utils.errors import is_transient_error
from dinov2_core.utils.uri import is_remote, read_bytes

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def eval_transform(resize_size: int, crop_size: int, interpolation: str = "bicubic") -> v2.Compose:
    """Resize (shorter side) → CenterCrop → float → ImageNet normalisation. Masks passed along as
    :class:`tv_tensors.Mask` are resized with nearest neighbour and left unnormalised."""
    mode = {"bicubic": v2.InterpolationMode.BICUBIC, "bilinear": v2.InterpolationMode.BILINEAR}[interpolation]
    return v2.Compose([
        v2.ToImage(),
        v2.Resize(resize_size, interpolation=mode, antialias=True),
        v2.CenterCrop(crop_size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


class ImageListDataset(torch.utils.data.Dataset):
    """Decodes ``uris[i]`` (and ``mask_uris[i]``); a failure yields ``(None, i, reason, None)``."""

    def __init__(self, uris: list[str], transform: Callable, mask_uris: list[str] | None = None):
        self.uris = uris
        self.transform = transform
        self.mask_uris = mask_uris

    def __len__(self) -> int:
        return len(self.uris)

    def __getitem__(self, index: int):
        uri = self.uris[index]
        try:
            data = read_bytes(uri)
        except Exception as err:  # a missing or unreadable file is skipped and counted like a corrupt one...
            if is_transient_error(err):  # ...but a storage outage is not a property of the image: fail, retry later
                raise
            return None, index, "unreadable", None
        try:
            image = decode_image(data, uri)
            digest = hashlib.sha256(data).hexdigest()
            if self.mask_uris is None:
                return {"image": self.transform(image)}, index, None, digest
            mask = Image.open(io.BytesIO(read_bytes(self.mask_uris[index])))
            mask = tv_tensors.Mask(torch.from_numpy(np.array(mask.convert("L"), dtype=np.int64)))
            if mask.shape[-2:] != (image.height, image.width):
                return None, index, "mask_size_mismatch", None
            out_image, out_mask = self.transform(image, mask)
            return {"image": out_image, "mask": out_mask.as_subclass(torch.Tensor)}, index, None, digest
        except ImageDecodeError as err:
            return None, index, err.reason, None
        except Exception:  # a broken mask file
            return None, index, "decode_error", None


def _collate(batch):
    good = [item for item in batch if item[0] is not None]
    bad = [(item[1], item[2]) for item in batch if item[0] is None]
    if not good:
        return None, bad
    tensors = {key: torch.stack([item[0][key] for item in good]) for key in good[0][0]}
    return (tensors, [item[1] for item in good], [item[3] for item in good]), bad


def backbone_depth(model: nn.Module) -> int:
    """Number of transformer blocks (``n_blocks`` on official-style ViTs, else ``len(blocks)``)."""
    depth = getattr(model, "n_blocks", None)
    if depth is None:
        depth = len(model.blocks)
    return int(depth)


class BackboneFeatures(nn.Module):
    """Wraps a frozen ViT: one ``get_intermediate_layers`` call gives cls, block cls and patch features."""

    def __init__(self, backbone: nn.Module, n_last_blocks: int = 1, keep_patch_map: bool = False):
        super().__init__()
        self.backbone = backbone
        self.n_last_blocks = max(1, min(n_last_blocks, backbone_depth(backbone)))
        self.keep_patch_map = keep_patch_map

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        layers = self.backbone.get_intermediate_layers(
            images, n=self.n_last_blocks, reshape=True, return_class_token=True, norm=True
        )
        last_patches, last_cls = layers[-1]
        out = {
            "cls": last_cls,
            "cls_blocks": torch.stack([cls for _, cls in layers], dim=1),
            "patch_mean": last_patches.flatten(2).mean(-1),
        }
        if self.keep_patch_map:
            out["patch_map"] = last_patches
        return out


class PixelFeatures(nn.Module):
    """Raw-pixel baseline: un-normalise, resize to ``size``², flatten (kNN L2-normalises later)."""

    def __init__(self, size: int = 32):
        super().__init__()
        self.size = size
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        pixels = images.float() * self.std + self.mean
        pixels = nn.functional.interpolate(pixels, size=(self.size, self.size), mode="bilinear", antialias=True)
        return {"cls": pixels.flatten(1)}


@dataclass
class FeatureSet:
    """Features of the images that decoded; ``indices`` point into the input URI list."""

    features: dict[str, torch.Tensor]
    indices: np.ndarray
    sha256: list[str]
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: 'cuda' requested but no CUDA device is available")
    return torch.device(name)


@torch.inference_mode()
def extract_features(
    model: nn.Module,
    uris: list[str],
    transform: Callable,
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    mask_uris: list[str] | None = None,
) -> FeatureSet:
    """Run ``model`` (returning a dict of (B, ...) tensors) over ``uris``; features land on CPU in fp32."""
    device = torch.device(device)
    model = model.to(device).eval()
    dataset = ImageListDataset(uris, transform, mask_uris)
    # s3fs is not fork-safe: remote images are read from spawned workers
    context = "spawn" if num_workers > 0 and any(is_remote(u) for u in uris[:1]) else None
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
        collate_fn=_collate, multiprocessing_context=context,
    )
    dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    chunks: dict[str, list[torch.Tensor]] = {}
    indices: list[int] = []
    hashes: list[str] = []
    skipped: Counter = Counter()
    for batch, bad in loader:
        skipped.update(reason for _, reason in bad)
        if batch is None:
            continue
        tensors, batch_indices, batch_hashes = batch
        images = tensors["image"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None and device.type == "cuda"):
            out = model(images)
        for key, value in out.items():
            chunks.setdefault(key, []).append(value.float().cpu())
        if "mask" in tensors:
            chunks.setdefault("mask", []).append(tensors["mask"])
        indices.extend(batch_indices)
        hashes.extend(batch_hashes)
    features = {key: torch.cat(values) for key, values in chunks.items()}
    return FeatureSet(features, np.asarray(indices, dtype=np.int64), hashes, dict(skipped))
