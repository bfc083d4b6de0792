"""Shared utilities: typed configs, atomic writes, manifests and robust image decoding."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pytest
from PIL import Image

from dinov2_core.data.image_io import ImageDecodeError, decode_image, load_image
from dinov2_core.data.manifest import ManifestRecord, label_names, read_manifest, write_manifest
from dinov2_core.utils.atomic import atomic_write_bytes, atomic_write_json
from dinov2_core.utils.config import ConfigError, apply_overrides, flatten, from_dict, load_config, to_dict


@dataclass
class Optim:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class Cfg:
    name: str = "run"
    centering: Literal["centering", "sinkhorn_knopp"] = "centering"
    steps: int = 10
    optim: Optim = field(default_factory=Optim)
    tags: list[str] = field(default_factory=list)
    resume_from: str | None = None

    def validate(self) -> None:
        if self.steps <= 0:
            raise ConfigError(f"steps: must be positive, got {self.steps}")


def test_from_dict_builds_nested_and_coerces():
    cfg = from_dict(Cfg, {"steps": 3, "optim": {"lr": 1, "betas": [0.8, 0.9]}, "tags": ["a"]})
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == (0.8, 0.9)
    assert to_dict(cfg)["optim"] == {"lr": 1.0, "betas": [0.8, 0.9]}


def test_literal_error_names_key_and_allowed_values():
    with pytest.raises(ConfigError, match=r"centering: 'sinkorn' is not one of \['centering', 'sinkhorn_knopp'\]"):
        from_dict(Cfg, {"centering": "sinkorn"})


def test_unknown_key_is_rejected_with_allowed_keys():
    with pytest.raises(ConfigError, match=r"optim\.lrr: unknown key; allowed keys are \['betas', 'lr'\]"):
        from_dict(Cfg, {"optim": {"lrr": 1}})


def test_wrong_type_and_validate_hook():
    with pytest.raises(ConfigError, match="steps: expected an integer"):
        from_dict(Cfg, {"steps": "many"})
    with pytest.raises(ConfigError, match="steps: must be positive"):
        from_dict(Cfg, {"steps": 0})


def test_overrides_and_yaml_defaults(tmp_path):
    (tmp_path / "base.yaml").write_text("steps: 5\noptim:\n  lr: 0.5\n")
    (tmp_path / "run.yaml").write_text("defaults: [base.yaml]\nname: child\n")
    cfg = load_config(Cfg, tmp_path / "run.yaml", ["optim.lr=0.25", "tags=[x, y]", "resume_from=null"])
    assert (cfg.name, cfg.steps, cfg.optim.lr, cfg.tags, cfg.resume_from) == ("child", 5, 0.25, ["x", "y"], None)
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_overrides({}, ["no_equals_sign"])
    assert flatten(cfg)["optim.lr"] == 0.25


def test_atomic_write_leaves_no_partial_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "out.json"
    atomic_write_json(target, {"a": 1})
    assert target.read_text().strip().startswith("{")

    def explode(*args, **kwargs):
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(os, "replace", explode)
    with pytest.raises(RuntimeError):
        atomic_write_bytes(target, b"new content")
    assert '"a": 1' in target.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def _jpeg_bytes(mode="RGB", size=(8, 6)) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, 128).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_image_decoding_reasons(tmp_path):
    good = _jpeg_bytes()
    assert decode_image(good).size == (8, 6)
    assert decode_image(_jpeg_bytes("CMYK")).mode == "RGB"
    with pytest.raises(ImageDecodeError) as err:
        decode_image(b"")
    assert err.value.reason == "empty"
    with pytest.raises(ImageDecodeError) as err:
        decode_image(b"definitely not an image")
    assert err.value.reason == "not_an_image"
    with pytest.raises(ImageDecodeError) as err:
        decode_image(good[: len(good) // 2])
    assert err.value.reason in ("truncated", "decode_error")
    with pytest.raises(ImageDecodeError) as err:
        load_image(tmp_path / "missing.jpg")
    assert err.value.reason == "unreadable"
    with pytest.raises(ImageDecodeError) as err:
        decode_image(good, max_pixels=10)
    assert err.value.reason == "too_large"


def test_sixteen_bit_and_alpha_become_rgb():
    buffer = io.BytesIO()
    Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16)).save(buffer, format="PNG")
    assert decode_image(buffer.getvalue()).getpixel((0, 0)) == (255, 255, 255)
    buffer = io.BytesIO()
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(buffer, format="PNG")
    assert decode_image(buffer.getvalue()).getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_manifest_round_trip_resolves_relative_uris(tmp_path, suffix):
    rows = [{"uri": "imgs/a.jpg", "label": "cat"}, {"uri": "/abs/b.jpg", "label": None}]
    path = write_manifest(rows, tmp_path / f"manifest{suffix}")
    records = read_manifest(path)
    assert records == [ManifestRecord(str(tmp_path / "imgs/a.jpg"), "cat"), ManifestRecord("/abs/b.jpg", None)]
    assert label_names(records) == ["cat"]


def test_manifest_text_and_s3(tmp_path, s3_bucket):
    (tmp_path / "list.txt").write_text("a.jpg\n\nb.jpg\n")
    assert [r.uri for r in read_manifest(tmp_path / "list.txt")] == [str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg")]
    uri = f"{s3_bucket}/m/manifest.parquet"
    write_manifest([ManifestRecord("x.jpg", "dog")], uri)
    assert read_manifest(uri) == [ManifestRecord(f"{s3_bucket}/m/x.jpg", "dog")]
    with pytest.raises(ValueError, match="unsupported suffix"):
        read_manifest(tmp_path / "manifest.xlsx")


def test_transient_error_classifier():
    import errno

    from dinov2_core.utils.errors import is_transient_error

    for exc in (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), ConnectionResetError(), TimeoutError(),
                OSError(errno.ETIMEDOUT, "timed out"), OSError(errno.ESTALE, "stale file handle")):
        assert is_transient_error(exc), exc
    for exc in (OSError(errno.ENOSPC, "No space left on device"), OSError(errno.EDQUOT, "Disk quota exceeded"),
                FileNotFoundError(errno.ENOENT, "missing"), PermissionError(errno.EACCES, "denied"),
                ValueError("bad config"), KeyError("x"), OSError("no errno")):
        assert not is_transient_error(exc), exc

    # botocore-like exceptions, recognised by class name and by the S3 error code / HTTP status
    EndpointConnectionError = type("EndpointConnectionError", (Exception,), {})
    ClientError = type("ClientError", (Exception,), {})

    def client_error(code, status):
        err = ClientError(code)
        err.response = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
        return err

    assert is_transient_error(EndpointConnectionError("Could not connect to the endpoint URL"))
    assert is_transient_error(client_error("SlowDown", 503)) and is_transient_error(client_error("Whatever", 500))
    assert not is_transient_error(client_error("NoSuchKey", 404)) and not is_transient_error(client_error("AccessDenied", 403))

    # a wrapper (s3fs raises OSError from the botocore error) is judged by its cause ...
    try:
        try:
            raise EndpointConnectionError("down")
        except Exception as inner:
            raise OSError("could not read s3://b/k") from inner
    except OSError as wrapped:
        assert is_transient_error(wrapped)
    # ... but a disk-full error stays permanent whatever caused it
    full = OSError(errno.ENOSPC, "No space left on device")
    full.__cause__ = ConnectionResetError()
    assert not is_transient_error(full)


def test_call_with_retries_retries_transient_errors_only():
    import errno

    from dinov2_core.utils.errors import call_with_retries

    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("reset by peer")
        return "ok"

    seen = []
    assert call_with_retries(flaky, retries=3, backoff_s=0.001, on_retry=lambda err, n: seen.append(n)) == "ok"
    assert len(calls) == 3 and seen == [1, 2]

    def full_disk():
        calls.append(1)
        raise OSError(errno.ENOSPC, "No space left on device")

    calls.clear()
    with pytest.raises(OSError, match="No space left"):
        call_with_retries(full_disk, retries=5, backoff_s=0.001)
    assert len(calls) == 1  # never retried

    def down():
        calls.append(1)
        raise ConnectionResetError("still down")

    calls.clear()
    with pytest.raises(ConnectionResetError):
        call_with_retries(down, retries=2, backoff_s=0.001)
    assert len(calls) == 3  # first try + 2 retries


def test_exif_orientation_is_applied():
    landscape = Image.new("RGB", (40, 20), (255, 0, 0))
    landscape.paste((0, 0, 255), (0, 0, 10, 20))  # blue band on the left edge of the stored pixels
    exif = landscape.getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    buffer = io.BytesIO()
    landscape.save(buffer, "JPEG", exif=exif.tobytes(), quality=95)
    upright = decode_image(buffer.getvalue())
    assert upright.size == (20, 40)
    blue, red = upright.getpixel((10, 3)), upright.getpixel((10, 36))  # the left band is now on top
    assert blue[2] > 200 and blue[0] < 50 and red[0] > 200 and red[2] < 50


@pytest.mark.parametrize("mode,fmt", [("I;16", "PNG"), ("I;16", "TIFF"), ("I;16B", "TIFF")])
def test_sixteen_bit_greyscale_keeps_its_full_range(mode, fmt):
    ramp = (np.arange(256, dtype=np.uint32).reshape(16, 16) * 257).astype(np.uint16)  # 0 … 65535
    raw = ramp.astype(">u2" if mode.endswith("B") else "<u2").tobytes()
    buffer = io.BytesIO()
    Image.frombytes(mode, (16, 16), raw).save(buffer, fmt)
    rgb = np.asarray(decode_image(buffer.getvalue()))
    assert rgb.dtype == np.uint8 and rgb.shape == (16, 16, 3)
    assert np.array_equal(rgb[..., 0], (ramp >> 8).astype(np.uint8)) and np.array_equal(rgb[..., 0], rgb[..., 2])


def test_transient_read_failures_are_raised_not_reported_as_undecodable(monkeypatch):
    import socket

    from dinov2_core.utils.errors import is_transient_error

    with socket.socket() as probe:  # a port nobody listens on: connection refused
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    try:
        with pytest.raises(Exception) as err:
            load_image("s3://bucket/image.jpg", read_retries=1, read_backoff_s=0.01)
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    assert not isinstance(err.value, ImageDecodeError)
    assert is_transient_error(err.value), repr(err.value)
