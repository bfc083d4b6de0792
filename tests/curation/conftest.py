"""Generated image data for the curation tests: distinct images, planted duplicates and corrupt files."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from curation.config import ClusterConfig

#: a small in-process dask cluster: real scheduler and workers, threads instead of processes
TEST_CLUSTER = ClusterConfig(n_workers=2, threads_per_worker=1, processes=False)


def distinct_image(seed: int, size: int = 48) -> Image.Image:
    """A smooth random colour image; different seeds give clearly different images."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(5, 5, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((size, size), Image.BICUBIC)


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def planted_variants(image: Image.Image) -> dict[str, Image.Image]:
    """Near-duplicates of ``image``: re-encode, resize, crop (>= 90 % area), flip, colour shift."""
    w, h = image.size
    return {
        "reencode": Image.open(io.BytesIO(jpeg_bytes(image, 50))).convert("RGB"),
        "resize": image.resize((w // 2 + 7, h // 2 + 7), Image.BILINEAR),
        "crop": image.crop((1, 2, w - 1, h - 1)),
        "flip": ImageOps.mirror(image),
        "colour": ImageEnhance.Brightness(ImageEnhance.Color(image).enhance(1.2)).enhance(1.1),
    }


def write_corrupt_files(directory: str) -> dict[str, str]:
    """Bad and unusual files; returns ``{file name: expected outcome}`` (a reject reason or 'ok')."""
    os.makedirs(directory, exist_ok=True)
    good = jpeg_bytes(distinct_image(999))
    expected = {}

    def put(name: str, data: bytes, outcome: str) -> None:
        with open(os.path.join(directory, name), "wb") as handle:
            handle.write(data)
        expected[name] = outcome

    put("truncated.jpg", good[: len(good) // 2], "truncated")
    put("empty.jpg", b"", "empty")
    put("text.jpg", b"this is not an image at all\n" * 10, "not_an_image")
    buffer = io.BytesIO()
    distinct_image(998).convert("CMYK").save(buffer, "JPEG")
    put("cmyk.jpg", buffer.getvalue(), "ok")
    buffer = io.BytesIO()
    Image.fromarray((np.arange(40 * 40, dtype=np.uint16).reshape(40, 40) * 40)).save(buffer, "PNG")
    put("gray16.png", buffer.getvalue(), "ok")
    buffer = io.BytesIO()
    rgba = distinct_image(997).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(buffer, "PNG")
    put("rgba.png", buffer.getvalue(), "ok")
    buffer = io.BytesIO()
    distinct_image(996, size=400).save(buffer, "PNG")  # rejected by the tests' small max_pixels
    put("huge.png", buffer.getvalue(), "too_large")
    return expected


@pytest.fixture
def image_folder(tmp_path):
    """An ImageFolder tree (2 classes × 6 distinct images) plus the corrupt files in class ``bad``."""
    root = tmp_path / "raw"
    for class_index, name in enumerate(("cats", "dogs")):
        os.makedirs(root / name)
        for i in range(6):
            distinct_image(100 * class_index + i).save(root / name / f"{i:03d}.jpg", quality=92)
    expected = write_corrupt_files(str(root / "bad"))
    return str(root), expected
