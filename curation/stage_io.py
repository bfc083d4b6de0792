"""Reading and writing stage outputs (Parquet, .npy, stage results) atomically on local paths or S3.

A stage is finished when its ``_RESULT.json`` exists and records the same fingerprint (config and
inputs) as the current call; it is written last, so a half-written stage is never taken as finished.
An input that names an existing file, directory or object enters the fingerprint with its content
identity (sizes and modification stamps or ETags), because upstream stages rewrite their outputs at
the same URI: a re-ingested ``manifest.parquet`` must make every stage after it recompute.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from typing import Any

import numpy as np

from dinov2_core.utils.atomic import atomic_write_bytes, atomic_write_json
from dinov2_core.utils.config import to_dict
from dinov2_core.utils.uri import exists, is_remote, join_uri, read_bytes

from curation.sources import listing_digest

RESULT_FILE = "_RESULT.json"


def content_identity(value: Any) -> Any:
    """``value`` as it enters a fingerprint: a path or URI of something that exists now becomes
    ``{"uri": ..., "content": digest of its sizes and modification stamps}`` (a directory: of every file
    below it); anything else (config values, ``None``, a path not written yet) is returned unchanged.

    Only metadata is listed, never file contents, so this stays cheap for large manifests and shards."""
    if not isinstance(value, (str, os.PathLike)):
        return value
    uri = os.fspath(value)
    # a plain word such as a source kind is not a local path unless something of that name exists
    if not is_remote(uri) and not os.path.exists(uri):
        return value
    try:
        return {"uri": uri, "content": listing_digest(uri)}
    except FileNotFoundError:
        return value


def fingerprint(cfg: Any, **inputs: Any) -> str:
    """A stable hash of a config (dataclass) and the stage inputs, with the current content identity
    of every input that is an existing path or URI (see :func:`content_identity`)."""
    stamped = {name: content_identity(value) for name, value in inputs.items()}
    payload = json.dumps({"config": to_dict(cfg), "inputs": stamped}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def finished_result(output_uri: str, stage_fingerprint: str) -> dict[str, Any] | None:
    """The stored result of a finished stage with the same fingerprint, else ``None``."""
    uri = join_uri(output_uri, RESULT_FILE)
    if not exists(uri):
        return None
    try:
        stored = json.loads(read_bytes(uri))
    except (OSError, ValueError):
        return None
    if stored.get("fingerprint") != stage_fingerprint:
        return None
    return stored.get("result")


def forget_result(output_uri: str) -> None:
    """Drop a stage's ``_RESULT.json`` so the next call recomputes it (per-shard markers are kept).

    The pipeline calls this before running a curation stage: its own completion record
    (``tasks.record``) already decided the stage must run, and a ``_RESULT.json`` left in the same place
    must not answer that question a second time (e.g. with outputs deleted since)."""
    from dinov2_core.utils.uri import filesystem_for

    uri = join_uri(output_uri, RESULT_FILE)
    if exists(uri):
        fs, path = filesystem_for(uri)
        fs.rm(path)


def mark_finished(output_uri: str, stage_fingerprint: str, result: dict[str, Any]) -> dict[str, Any]:
    atomic_write_json(join_uri(output_uri, RESULT_FILE), {"fingerprint": stage_fingerprint, "result": result})
    return result


def write_parquet(table_or_rows: Any, uri: str, schema: Any = None) -> str:
    """Write a pyarrow Table (or list of dicts) to ``uri`` atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = table_or_rows
    if not isinstance(table, pa.Table):
        table = pa.Table.from_pylist(list(table_or_rows), schema=schema)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    atomic_write_bytes(uri, buffer.getvalue())
    return uri


def read_parquet(uri: str):
    """A pyarrow Table from a local or remote Parquet file."""
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(read_bytes(uri)))


def save_npy(array: np.ndarray, uri: str) -> str:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    atomic_write_bytes(uri, buffer.getvalue())
    return uri


def load_npy(uri: str) -> np.ndarray:
    return np.load(io.BytesIO(read_bytes(uri)), allow_pickle=False)
