"""Small, seeded, procedurally drawn image datasets for tests, the demo and quick evaluations.

Two kinds are written to disk so that every stage reads them exactly like user data:

* **classification**: an ImageFolder tree ``root/<class>/<index>.png`` plus a manifest with
  ``uri, label``. Two kinds:

  - ``shape_and_colour`` (default, for tests): a class is a (shape, colour) pair on a plain noisy
    background; position and scale are random. Easy: even raw pixels separate the classes by colour.
  - ``shape``: a class is a shape only. Its colours (a rainbow gradient in a random direction),
    position, scale, rotation and a grey textured background (random stripes, blobs or gradient)
    are drawn at random per image, so raw pixels carry little class information: leave-one-out
    1-NN on pixels scores about 35-45 % with 4 classes (chance 25 %), against about 100 % on
    ``shape_and_colour``. Meant as demo data on which a backbone has to learn shapes; a vit_test
    pretrained for 1200 CPU steps does not yet beat the raw pixels on it (about 38 % kNN).
  - ``pattern`` (the demo's data): a class is a periodic grey pattern filling the whole image
    (horizontal stripes, vertical stripes, checkerboard, dots). Period, phase, a ±20° tilt, the two
    grey levels, edge sharpness and a linear illumination gradient are drawn at random per image, so
    raw pixels stay low (leave-one-out 1-NN about 40-50 % with 4 classes, chance 25 %), while every
    crop carries the class: the crop-consistency objective of DINO learns it in a few hundred CPU steps.
* **segmentation**: images with one to three solid shapes on a noisy background and a per-pixel
  label PNG (mode ``L``, 0 = background, ``k`` = shape class ``k``) plus a manifest with
  ``uri, mask_uri, label``.

Generation is deterministic: image ``i`` of class ``c`` depends only on ``(seed, c, i)``. A few
hundred 32–64 px images take well under a second or two. Manifest URIs are relative to the manifest,
so a generated tree can be moved or uploaded to S3 as a whole. Image files are plain writes (an
fsync per tiny file would dominate the run time); the manifest is written atomically last, so a
dataset is complete exactly when its manifest exists.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from dinov2_core.data.manifest import write_manifest

SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond", "stripes", "checker")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 215, 40),
    "magenta": (210, 50, 200),
    "cyan": (40, 210, 220),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
}
#: Classes of the ``shape`` kind, most distinct first (``num_classes`` takes a prefix). No square:
#: rotated by 45° it would be a diamond.
SHAPE_ONLY_CLASSES = ("ring", "cross", "triangle", "diamond", "circle")
#: Classes of the ``pattern`` kind. No diagonal stripes: the horizontal flip of the training
#: augmentation would merge the two diagonals into one class.
PATTERN_CLASSES = ("horizontal_stripes", "vertical_stripes", "checkerboard", "dots")
CLASSIFICATION_KINDS = ("shape_and_colour", "shape", "pattern")
#: Solid shapes used for segmentation (textures make masks ambiguous at 32 px).
SEGMENTATION_SHAPES = ("circle", "square", "triangle", "cross", "diamond")


@dataclass(frozen=True)
class SyntheticDataset:
    """Where a generated dataset lives and what it contains."""

    root: str
    manifest_uri: str
    class_names: tuple[str, ...]
    num_images: int
    num_corrupt: int = 0


def classification_class_names(num_classes: int, kind: str = "shape_and_colour") -> list[str]:
    """Class names of the first ``num_classes`` classes of ``kind``: ``<shape>_<colour>`` (shape and
    colour both differ) for ``shape_and_colour``, the shape name for ``shape``, the pattern name for
    ``pattern``."""
    if kind not in CLASSIFICATION_KINDS:
        raise ValueError(f"kind: {kind!r} is not one of {list(CLASSIFICATION_KINDS)}")
    single_property = {"shape": SHAPE_ONLY_CLASSES, "pattern": PATTERN_CLASSES}.get(kind)
    if single_property is not None:
        if not 2 <= num_classes <= len(single_property):
            raise ValueError(
                f"num_classes must be in [2, {len(single_property)}] for kind {kind!r}, got {num_classes}"
            )
        return list(single_property[:num_classes])
    if not 2 <= num_classes <= len(SHAPES) * len(COLOURS):
        raise ValueError(f"num_classes must be in [2, {len(SHAPES) * len(COLOURS)}], got {num_classes}")
    colours = list(COLOURS)
    names = []
    for index in range(num_classes):
        shape = SHAPES[index % len(SHAPES)]
        colour = colours[(index + index // len(SHAPES)) % len(colours)]
        names.append(f"{shape}_{colour}")
    return names


def _shape_mask(kind: str, size: int, box: tuple[int, int, int, int]) -> Image.Image:
    """A mode-``L`` mask (255 inside) of one shape inside ``box`` = (x0, y0, x1, y1)."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    w, h = x1 - x0, y1 - y0
    if kind == "circle":
        draw.ellipse(box, fill=255)
    elif kind in ("square", "stripes", "checker"):
        draw.rectangle(box, fill=255)
    elif kind == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=255)
    elif kind == "cross":
        bar = max(2, round(min(w, h) / 3))
        draw.rectangle((x0, cy - bar / 2, x1, cy + bar / 2), fill=255)
        draw.rectangle((cx - bar / 2, y0, cx + bar / 2, y1), fill=255)
    elif kind == "ring":
        draw.ellipse(box, fill=255)
        inset = max(2, round(min(w, h) / 4))
        draw.ellipse((x0 + inset, y0 + inset, x1 - inset, y1 - inset), fill=0)
    elif kind == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=255)
    else:
        raise ValueError(f"unknown shape {kind!r}; allowed: {list(SHAPES)}")
    return mask


def _texture(kind: str, size: int, colour: tuple[int, int, int], period: int) -> np.ndarray:
    """An RGB fill for the shape: flat colour, or stripes / a checkerboard of colour and black."""
    yy, xx = np.mgrid[0:size, 0:size]
    if kind == "stripes":
        on = (yy // period) % 2 == 0
    elif kind == "checker":
        on = ((yy // period) + (xx // period)) % 2 == 0
    else:
        on = np.ones((size, size), dtype=bool)
    return np.where(on[..., None], np.asarray(colour, np.float32), np.float32(15.0))


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    level = rng.uniform(60, 140)
    tint = rng.uniform(-15, 15, size=3)
    return np.clip(level + tint + rng.normal(0, 12, size=(size, size, 3)), 0, 255).astype(np.float32)


def _random_box(rng: np.random.Generator, size: int, min_frac: float, max_frac: float) -> tuple[int, int, int, int]:
    side = int(round(size * rng.uniform(min_frac, max_frac)))
    x0 = int(rng.integers(0, size - side + 1))
    y0 = int(rng.integers(0, size - side + 1))
    return x0, y0, x0 + side - 1, y0 + side - 1


def _paint(canvas: np.ndarray, mask: Image.Image, fill: np.ndarray) -> None:
    alpha = (np.asarray(mask, np.float32) / 255.0)[..., None]
    canvas *= 1 - alpha
    canvas += alpha * fill


def _write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(data)


def _encode(array: np.ndarray, image_format: str) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))
    if image_format == "jpg":
        image.save(buffer, format="JPEG", quality=92)
    else:
        image.save(buffer, format="PNG")
    return buffer.getvalue()


def draw_classification_image(class_name: str, rng: np.random.Generator, image_size: int) -> np.ndarray:
    """One ``image_size``² RGB float array of class ``class_name`` (``<shape>_<colour>``)."""
    shape, colour_name = class_name.split("_", 1)
    colour = np.asarray(COLOURS[colour_name], np.float32)
    colour = np.clip(colour * rng.uniform(0.8, 1.1), 0, 255)
    canvas = _background(rng, image_size)
    box = _random_box(rng, image_size, 0.45, 0.85)
    period = max(2, image_size // 10)
    _paint(canvas, _shape_mask(shape, image_size, box), _texture(shape, image_size, tuple(colour), period))
    canvas += rng.normal(0, 6, size=canvas.shape)
    return canvas


def _grey_texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A grey (H, W, 3) background: stripes (random angle, period, phase), blobs or a gradient between
    two random grey levels, plus noise. Grey on purpose: a colourful background is what a short
    self-supervised run latches onto first, and it would never learn the shapes."""
    low, high = sorted(rng.uniform(30, 225, size=2))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    along = xx * np.cos(angle) + yy * np.sin(angle)
    pattern = int(rng.integers(0, 3))
    if pattern == 0:  # stripes
        period = rng.uniform(3, size / 3)
        mix = 0.5 + 0.5 * np.sin(2 * np.pi * along / period + rng.uniform(0, 2 * np.pi))
    elif pattern == 1:  # blobs: coarse noise upsampled smoothly
        cells = int(rng.integers(3, 7))
        coarse = Image.fromarray((rng.uniform(0, 1, size=(cells, cells)) * 255).astype(np.uint8))
        mix = np.asarray(coarse.resize((size, size), Image.BICUBIC), np.float32) / 255
    else:  # gradient
        mix = (along - along.min()) / max(float(along.max() - along.min()), 1e-6)
    grey = low + (high - low) * mix
    return np.repeat(grey[..., None], 3, axis=2) + rng.normal(0, 10, size=(size, size, 3)).astype(np.float32)


def _rainbow(rng: np.random.Generator, size: int, box: tuple[int, int, int, int], bright: bool) -> np.ndarray:
    """An (H, W, 3) fill whose hue runs once through the whole colour circle across ``box`` along a
    random direction, from a random starting hue: every shape contains every colour, so colour says
    nothing about the image (a short self-supervised run would otherwise sort images by colour and
    never get to their shapes)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    along = (xx - box[0]) * np.cos(angle) + (yy - box[1]) * np.sin(angle)
    hue = (rng.uniform(0, 1) + along / max(box[2] - box[0], 1)) % 1.0
    saturation = rng.uniform(0.6, 1.0)
    value = rng.uniform(0.85, 1.0) if bright else rng.uniform(0.25, 0.4)
    hsv = np.stack([hue, np.full_like(hue, saturation), np.full_like(hue, value)], axis=-1)
    return np.asarray(Image.fromarray(np.round(hsv * 255).astype(np.uint8), "HSV").convert("RGB"), np.float32)


def draw_shape_image(shape: str, rng: np.random.Generator, image_size: int) -> np.ndarray:
    """One ``image_size``² RGB float array of the ``shape`` kind: a solid ``shape`` filled with a
    rainbow gradient (random direction and starting hue), at a random position, scale and rotation
    (±30°), on a random grey texture. The shape is bright on dark backgrounds and dark on bright
    ones, so it stays visible."""
    if shape not in SHAPE_ONLY_CLASSES:
        raise ValueError(f"unknown shape {shape!r}; allowed: {list(SHAPE_ONLY_CLASSES)}")
    canvas = _grey_texture(rng, image_size)
    box = _random_box(rng, image_size, 0.35, 0.75)
    centre = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
    mask = _shape_mask(shape, image_size, box).rotate(rng.uniform(-30, 30), Image.BILINEAR, center=centre)
    _paint(canvas, mask, _rainbow(rng, image_size, box, bright=canvas.mean() < 128))
    canvas += rng.normal(0, 6, size=canvas.shape)
    return canvas


def draw_pattern_image(pattern: str, rng: np.random.Generator, image_size: int) -> np.ndarray:
    """One ``image_size``² RGB float array of the ``pattern`` kind: ``pattern`` over the whole image
    with a random period (4-10 px), phase, tilt (±20°), edge sharpness, two random grey levels (at
    least 70 apart, either one on the pattern) and a random linear illumination gradient, plus
    noise. Grey on purpose: random colours would be the per-image identity a short self-supervised
    run learns first, instead of the pattern."""
    if pattern not in PATTERN_CLASSES:
        raise ValueError(f"unknown pattern {pattern!r}; allowed: {list(PATTERN_CLASSES)}")
    yy, xx = np.mgrid[0:image_size, 0:image_size].astype(np.float32)
    tilt = np.deg2rad(rng.uniform(-20, 20))
    xx, yy = xx * np.cos(tilt) - yy * np.sin(tilt), xx * np.sin(tilt) + yy * np.cos(tilt)
    period = rng.uniform(4, 10)
    phase_x, phase_y = rng.uniform(0, period, size=2)
    wave_x, wave_y = np.sin(2 * np.pi * (xx + phase_x) / period), np.sin(2 * np.pi * (yy + phase_y) / period)
    if pattern == "horizontal_stripes":
        signal = wave_y
    elif pattern == "vertical_stripes":
        signal = wave_x
    elif pattern == "checkerboard":
        signal = 2 * wave_x * wave_y
    else:  # dots: discs of radius 0.28 period on a square lattice
        offset_x = (xx + phase_x) % period - period / 2
        offset_y = (yy + phase_y) % period - period / 2
        signal = np.where(np.hypot(offset_x, offset_y) < 0.28 * period, 1.0, -1.0)
    sharpness = rng.uniform(1, 6)
    on = 1 / (1 + np.exp(-sharpness * signal))  # soft (sine-like) to hard (binary) edges
    contrast = rng.uniform(70, 200)  # at least 70 grey levels: every image shows its pattern
    low = rng.uniform(0, 255 - contrast)
    dark_on_bright = rng.random() < 0.5
    grey = low + contrast * (1 - on if dark_on_bright else on)
    slope_x, slope_y = rng.uniform(-0.7, 0.7, size=2)
    grid = np.linspace(-0.5, 0.5, image_size, dtype=np.float32)
    grey = grey * (1 + slope_x * grid[None, :] + slope_y * grid[:, None])
    return np.repeat(grey[..., None], 3, axis=2) + rng.normal(0, 8, size=(image_size, image_size, 3))


_DRAW_BY_KIND = {
    "shape_and_colour": draw_classification_image,
    "shape": draw_shape_image,
    "pattern": draw_pattern_image,
}


def make_classification_dataset(
    root: str | os.PathLike,
    num_classes: int = 4,
    images_per_class: int = 24,
    image_size: int = 32,
    seed: int = 0,
    image_format: str = "png",
    corrupt_images: int = 0,
    manifest_name: str = "manifest.parquet",
    kind: str = "shape_and_colour",
) -> SyntheticDataset:
    """Write an ImageFolder tree ``root/<class>/<i>.<ext>`` and ``root/<manifest_name>`` (uri, label).

    ``kind`` is ``shape_and_colour`` (class = shape + colour; manifest grouped by class), ``shape``
    (class = shape only, everything else random) or ``pattern`` (class = a periodic grey pattern,
    everything else random); for the last two the manifest rows are interleaved by class, so the
    first few rows, e.g. the images a PCA figure shows, cover different classes.
    ``corrupt_images`` extra files (truncated PNGs / non-images) are added to the first class and to
    the manifest, so callers can check that corrupt inputs are skipped and counted.
    """
    if image_format not in ("png", "jpg"):
        raise ValueError(f"image_format: {image_format!r} is not one of ['png', 'jpg']")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    root = os.fspath(root)
    names = classification_class_names(num_classes, kind)
    draw = _DRAW_BY_KIND[kind]
    order = [(c, i) for c in range(num_classes) for i in range(images_per_class)]
    if kind != "shape_and_colour":
        order.sort(key=lambda class_and_index: (class_and_index[1], class_and_index[0]))
    rows = []
    for class_index, i in order:
        name = names[class_index]
        rng = np.random.default_rng([seed, class_index, i])
        relative = f"{name}/{i:05d}.{image_format}"
        image = draw(name, rng, image_size)
        _write(os.path.join(root, relative), _encode(image, image_format))
        rows.append({"uri": relative, "label": name})
    for j in range(corrupt_images):
        relative = f"{names[0]}/corrupt_{j:03d}.{image_format}"
        valid = _encode(np.zeros((image_size, image_size, 3)), image_format)
        payload = valid[: len(valid) // 3] if j % 2 == 0 else b"this is not an image"
        _write(os.path.join(root, relative), payload)
        rows.append({"uri": relative, "label": names[0]})
    manifest_uri = os.path.join(root, manifest_name)
    write_manifest(rows, manifest_uri)
    return SyntheticDataset(root, manifest_uri, tuple(names), len(rows), corrupt_images)


def make_classification_splits(
    root: str | os.PathLike,
    num_classes: int = 4,
    train_per_class: int = 24,
    test_per_class: int = 8,
    image_size: int = 32,
    seed: int = 0,
    image_format: str = "png",
    kind: str = "shape_and_colour",
) -> dict[str, SyntheticDataset]:
    """``root/train`` and ``root/test`` classification trees of ``kind`` drawn with different seeds."""
    root = os.fspath(root)
    return {
        "train": make_classification_dataset(
            os.path.join(root, "train"), num_classes, train_per_class, image_size, seed, image_format, kind=kind
        ),
        "test": make_classification_dataset(
            os.path.join(root, "test"), num_classes, test_per_class, image_size, seed + 1_000_003, image_format,
            kind=kind,
        ),
    }


def make_segmentation_dataset(
    root: str | os.PathLike,
    num_images: int = 32,
    image_size: int = 32,
    num_classes: int = 3,
    seed: int = 0,
    manifest_name: str = "manifest.parquet",
) -> SyntheticDataset:
    """Write ``root/images/<i>.png``, ``root/masks/<i>.png`` and a manifest (uri, mask_uri, label).

    Class ``k`` (1-based) is shape ``SEGMENTATION_SHAPES[k-1]`` in colour ``k-1``; later shapes are
    drawn over earlier ones and the mask follows the visible pixels. ``label`` is the class of the
    largest visible shape (handy for retrieval checks).
    """
    if not 1 <= num_classes <= len(SEGMENTATION_SHAPES):
        raise ValueError(f"num_classes must be in [1, {len(SEGMENTATION_SHAPES)}], got {num_classes}")
    root = os.fspath(root)
    colours = list(COLOURS.values())
    class_names = ["background", *SEGMENTATION_SHAPES[:num_classes]]
    rows = []
    for i in range(num_images):
        rng = np.random.default_rng([seed, 7919, i])
        canvas = _background(rng, image_size)
        labels = np.zeros((image_size, image_size), np.uint8)
        for _ in range(int(rng.integers(1, 4))):
            cls = int(rng.integers(1, num_classes + 1))
            box = _random_box(rng, image_size, 0.3, 0.6)
            mask = _shape_mask(SEGMENTATION_SHAPES[cls - 1], image_size, box)
            _paint(canvas, mask, np.asarray(colours[cls - 1], np.float32))
            labels[np.asarray(mask) >= 128] = cls
        canvas += rng.normal(0, 6, size=canvas.shape)
        counts = np.bincount(labels.ravel(), minlength=num_classes + 1)[1:]
        image_rel, mask_rel = f"images/{i:05d}.png", f"masks/{i:05d}.png"
        _write(os.path.join(root, image_rel), _encode(canvas, "png"))
        mask_buffer = io.BytesIO()
        Image.fromarray(labels, mode="L").save(mask_buffer, format="PNG")
        _write(os.path.join(root, mask_rel), mask_buffer.getvalue())
        rows.append({"uri": image_rel, "mask_uri": mask_rel, "label": class_names[1 + int(counts.argmax())]})
    manifest_uri = os.path.join(root, manifest_name)
    write_manifest(rows, manifest_uri)
    return SyntheticDataset(root, manifest_uri, tuple(class_names), num_images)
