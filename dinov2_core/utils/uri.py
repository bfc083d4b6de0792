"""URI access for local paths and object stores through fsspec (installed with torch).

``s3://`` needs s3fs at call time only. The S3 endpoint (e.g. a local moto server) comes from the
standard ``AWS_ENDPOINT_URL`` variable, so the same code talks to AWS or to 127.0.0.1.
"""

from __future__ import annotations

import os
from typing import Any

REMOTE_PREFIXES = ("s3://", "gs://", "gcs://", "az://", "abfs://", "http://", "https://", "memory://")


def is_remote(uri: str | os.PathLike) -> bool:
    return str(uri).startswith(REMOTE_PREFIXES)


def storage_options(uri: str) -> dict[str, Any]:
    """fsspec keyword arguments for ``uri``: the S3 endpoint override when one is configured."""
    if str(uri).startswith("s3://"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
        if endpoint:
            return {"client_kwargs": {"endpoint_url": endpoint}}
    return {}


def filesystem_for(uri: str | os.PathLike):
    """Return ``(filesystem, path_within_filesystem)`` for a local path or remote URI."""
    import fsspec

    uri = os.fspath(uri)
    if not is_remote(uri):
        return fsspec.filesystem("file"), os.path.abspath(uri)
    fs, path = fsspec.core.url_to_fs(uri, **storage_options(uri))
    return fs, path


def open_uri(uri: str | os.PathLike, mode: str = "rb"):
    """Open a local path or remote URI as a file object (use as a context manager)."""
    uri = os.fspath(uri)
    if not is_remote(uri):
        return open(uri, mode)
    fs, path = filesystem_for(uri)
    return fs.open(path, mode)


def read_bytes(uri: str | os.PathLike) -> bytes:
    with open_uri(uri, "rb") as handle:
        return handle.read()


def join_uri(base: str, *parts: str) -> str:
    """Join path segments onto a local path or a URI with '/' separators."""
    if is_remote(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(base, *parts)


def exists(uri: str | os.PathLike) -> bool:
    fs, path = filesystem_for(uri)
    return fs.exists(path)
