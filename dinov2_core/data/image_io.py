"""Decode images robustly: every failure becomes an :class:`ImageDecodeError` with a short reason.

Training, evaluation and curation all read images through :func:`load_image`, so a corrupt,
truncated, empty or non-image file is skipped and counted by the caller instead of crashing a run.
Unusual modes (CMYK, 16-bit, palette, alpha) are converted to 8-bit RGB; alpha is composited on
white so transparent regions do not turn black.
"""

from __future__ import annotations

import io
import os
import warnings

from PIL import Image, UnidentifiedImageError

from dinov2_core.utils.uri import read_bytes

#: Larger images are rejected as ``too_large`` (about 16k x 16k); PIL's own bomb check is stricter.
DEFAULT_MAX_PIXELS = 256_000_000

REJECT_REASONS = ("unreadable", "empty", "not_an_image", "truncated", "too_large", "decode_error")


class ImageDecodeError(Exception):
    """An image could not be used. ``reason`` is one of :data:`REJECT_REASONS`."""

    def __init__(self, reason: str, uri: str, detail: str = ""):
        super().__init__(f"{uri}: {reason}{': ' + detail if detail else ''}")
        self.reason = reason
        self.uri = uri
        self.detail = detail


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (alpha composited on white, 16-bit rescaled)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = image.point(lambda v: v * (1 / 256)).convert("L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(data: bytes, uri: str = "<bytes>", max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode ``data`` into a fully loaded RGB PIL image or raise :class:`ImageDecodeError`."""
    if not data:
        raise ImageDecodeError("empty", uri)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageDecodeError("too_large", uri, f"{width}x{height}")
            image.load()
    except ImageDecodeError:
        raise
    except UnidentifiedImageError as err:
        raise ImageDecodeError("not_an_image", uri, str(err)) from err
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageDecodeError("too_large", uri, str(err)) from err
    except OSError as err:
        reason = "truncated" if "truncated" in str(err).lower() else "decode_error"
        raise ImageDecodeError(reason, uri, str(err)) from err
    except Exception as err:  # PIL raises assorted errors on malformed files
        raise ImageDecodeError("decode_error", uri, f"{type(err).__name__}: {err}") from err
    if image.size[0] == 0 or image.size[1] == 0:
        raise ImageDecodeError("empty", uri, "zero-sized image")
    return to_rgb(image)


def load_image(uri: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Read and decode the image at ``uri`` (local path or fsspec URI) as RGB."""
    uri = os.fspath(uri)
    try:
        data = read_bytes(uri)
    except Exception as err:  # missing file, permission, network: the caller skips and counts
        raise ImageDecodeError("unreadable", uri, f"{type(err).__name__}: {err}") from err
    return decode_image(data, uri, max_pixels)
