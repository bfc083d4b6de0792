"""URI access for local paths and object stores through fsspec (installed with torch).

``s3://`` needs s3fs at call time only. Members of tar shards are addressed with fsspec URL chaining,
``tar://<member>::file:///abs/shard.tar`` or ``tar://<member>::s3://bucket/shard.tar``. The S3 endpoint (e.g. a local moto server) comes from the
standard ``AWS_ENDPOINT_URL`` variable, so the same code talks to AWS or to 127.0.0.1.
"""

from __future__ import annotations

import os
from typing import Any

REMOTE_PREFIXES = ("s3://", "gs://", "gcs://", "az://", "abfs://", "http://", "https://", "memory://", "tar://")


def is_remote(uri: str | os.PathLike) -> bool:
    return str(uri).startswith(REMOTE_PREFIXES)


def _s3_options() -> dict[str, Any]:
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
    return {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}


def storage_options(uri: str) -> dict[str, Any]:
    """fsspec keyword arguments for ``uri``: the S3 endpoint override when one is configured
    (for a chained URL such as ``tar://m::s3://b/x.tar`` it goes to the inner ``s3`` layer)."""
    uri = str(uri)
    if uri.startswith("s3://"):
        return _s3_options()
    if "::s3://" in uri:
        options = _s3_options()
        return {"s3": options} if options else {}
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
    uri = os.fspath(uri)
    if not is_remote(uri):
        with open(uri, "rb") as handle:
            return handle.read()
    # cat_file keeps the filesystem alive while reading: a chained tar:// filesystem closes its
    # underlying archive once it is garbage collected, which would break a returned handle.
    fs, path = filesystem_for(uri)
    return fs.cat_file(path)


def join_uri(base: str, *parts: str) -> str:
    """Join path segments onto a local path or a URI with '/' separators."""
    if is_remote(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(base, *parts)


def exists(uri: str | os.PathLike) -> bool:
    fs, path = filesystem_for(uri)
    return fs.exists(path)
