"""Image descriptors for embedding: a non-learned thumbnail descriptor and learned ViT backbones.

The ``pixels`` descriptor is a ``size``×``size`` RGB thumbnail (box-filtered, so JPEG noise and
resizing barely change it), mean-centred per channel (robust to brightness and colour casts) and
L2-normalised: cosine similarity is then a normalised cross-correlation of thumbnails. It needs no
weights, which matters because no pretrained copy-detection model can be downloaded here, and a
randomly initialised ViT does not separate near-duplicates from other images.

Crops move content relative to the thumbnail grid, so the descriptor can also return *views*:
thumbnails of a ``grid``×``grid`` set of shifted crops of side ``crop_side`` (plus the full image).
Dedup matches an image's full thumbnail against the other images' views, which catches crops that
keep most of the image (and, with the mirrored view, horizontal flips) while every comparison stays
a plain inner product.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
from PIL import Image


def crop_boxes(width: int, height: int, side: float, grid: int) -> list[tuple[float, float, float, float]]:
    """The full image box followed by ``grid``² crop boxes of relative side ``side`` on a regular grid."""
    boxes = [(0.0, 0.0, float(width), float(height))]
    crop_w, crop_h = width * side, height * side
    for y in np.linspace(0.0, height - crop_h, grid):
        for x in np.linspace(0.0, width - crop_w, grid):
            boxes.append((float(x), float(y), float(x + crop_w), float(y + crop_h)))
    return boxes


def _thumbnail_vector(image: Image.Image, size: int, box: tuple[float, float, float, float] | None) -> np.ndarray:
    pixels = np.asarray(image.resize((size, size), Image.BOX, box=box), dtype=np.float32)
    pixels = pixels - pixels.mean(axis=(0, 1), keepdims=True)
    vector = pixels.reshape(-1)
    return vector / (np.linalg.norm(vector) + 1e-6)


def pixel_descriptor(image: Image.Image, size: int = 12, crop_views: bool = False, crop_side: float = 0.95,
                     grid: int = 3, flip_view: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """``(descriptor (3·size²,), views or None)`` for an RGB image; views are the full thumbnail,
    ``grid``² shifted crops and (with ``flip_view``) the mirrored image."""
    image = image.convert("RGB")
    full = _thumbnail_vector(image, size, None)
    if not crop_views:
        return full, None
    views = [full] + [_thumbnail_vector(image, size, box) for box in crop_boxes(*image.size, crop_side, grid)[1:]]
    if flip_view:
        views.append(_thumbnail_vector(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), size, None))
    return full, np.stack(views)


def pixel_descriptor_dim(size: int) -> int:
    return 3 * size * size


_MODEL_CACHE: dict[tuple, Any] = {}
_MODEL_LOCK = threading.Lock()


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("embed.device: 'cuda' requested but torch sees no GPU; allowed here: ['auto', 'cpu']")
    return device


def load_model(model: str, checkpoint: str | None, arch: str, device: str):
    """A backbone in eval mode on ``device``, cached per process (one load per dask worker)."""
    key = (model, checkpoint, arch, device)
    with _MODEL_LOCK:
        if key not in _MODEL_CACHE:
            if model == "checkpoint":
                from dinov2_core.models.checkpoint_io import load_backbone

                backbone = load_backbone(checkpoint)
            else:
                import torch

                from dinov2_core.models import build_backbone

                torch.manual_seed(0)  # the same random backbone on every worker
                backbone = build_backbone(arch)
            _MODEL_CACHE[key] = backbone.eval().to(device)
        return _MODEL_CACHE[key]


def model_descriptors(images: list[Image.Image], backbone, image_size: int, device: str) -> np.ndarray:
    """L2-normalised class-token embeddings of ``images`` (resized to ``image_size``² rounded down to
    whole patches, ImageNet-normalised)."""
    import torch
    from torchvision.transforms import v2

    patch = int(getattr(backbone, "patch_size", 1) or 1)
    image_size = max(patch, image_size // patch * patch)  # the backbone needs whole patches
    transform = v2.Compose([
        v2.ToImage(), v2.Resize((image_size, image_size), antialias=True), v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    ])
    batch = torch.stack([transform(image.convert("RGB")) for image in images]).to(device)
    with torch.inference_mode():
        features = backbone(batch)
        if isinstance(features, dict):  # backbones returning a dict of outputs
            features = features.get("x_norm_clstoken", next(iter(features.values())))
        features = torch.nn.functional.normalize(features.float(), dim=-1)
    return features.cpu().numpy()
