"""Decode images robustly: every failure becomes an :class:`ImageDecodeError` with a short reason.

Training, evaluation and curation all read images through :func:`load_image`, so a corrupt,
truncated, empty or non-image file is skipped and counted by the caller instead of crashing a run.
Unusual modes (CMYK, 16-bit, float, palette, alpha) are converted to 8-bit RGB; alpha is composited on
white so transparent regions do not turn black. EXIF orientation is applied, so rotated photos are
upright. A transient read failure (network, S3 outage) is retried and then raised as it is, never
reported as an undecodable image.
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from dinov2_core.utils.errors import call_with_retries, is_transient_error
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


def _high_bit_depth_to_gray(image: Image.Image) -> Image.Image:
    """16-bit (any byte order), 32-bit integer and float greyscale as 8-bit ``L``.

    16-bit keeps its top byte (0..65535 -> 0..255, as a viewer shows it). 32-bit integer images are read
    as 16-bit when their values fit (how PNG/TIFF decoders widen them), else scaled by their maximum;
    float images are taken as 0..1 when they fit, else scaled by their range."""
    pixels = np.asarray(image)
    if image.mode.startswith("I;16"):
        scaled = pixels.astype(np.uint16) >> 8
    elif image.mode == "I":
        peak = int(pixels.max(initial=0))
        if peak <= 255:
            scaled = np.clip(pixels, 0, 255)
        elif peak <= 65535:
            scaled = np.clip(pixels, 0, 65535) >> 8
        else:
            scaled = np.clip(pixels, 0, None).astype(np.float64) * (255.0 / peak)
    else:  # "F"
        low, high = float(np.nanmin(pixels, initial=0.0)), float(np.nanmax(pixels, initial=0.0))
        if low >= 0.0 and high <= 1.0:
            scaled = pixels * 255.0
        else:
            scaled = (pixels - low) * (255.0 / (high - low or 1.0))
        scaled = np.nan_to_num(scaled)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (alpha composited on white, 16-bit and float rescaled)."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":
        image = _high_bit_depth_to_gray(image)
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
    return to_rgb(upright(image))


def upright(image: Image.Image) -> Image.Image:
    """``image`` rotated/flipped as its EXIF orientation tag says (cameras store rotated photos as
    unrotated pixels plus the tag). A malformed EXIF block leaves the pixels as they are."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # broken metadata does not make the pixels unusable
        return image


def load_image(uri: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS, read_retries: int = 3,
               read_backoff_s: float = 0.5) -> Image.Image:
    """Read and decode the image at ``uri`` (local path or fsspec URI) as RGB, EXIF orientation applied.

    A transient read failure (connection refused or reset, timeout, S3 5xx/throttling; see
    :func:`dinov2_core.utils.errors.is_transient_error`) is retried ``read_retries`` times with
    exponential backoff and then re-raised as it is: it is not a property of the image, so callers must
    not count it as a rejected image. A permanent read failure (missing file, permission denied) raises
    :class:`ImageDecodeError` ``unreadable``.
    """
    uri = os.fspath(uri)
    try:
        data = call_with_retries(lambda: read_bytes(uri), read_retries, read_backoff_s)
    except Exception as err:
        if is_transient_error(err):
            raise
        raise ImageDecodeError("unreadable", uri, f"{type(err).__name__}: {err}") from err
    return decode_image(data, uri, max_pixels)
