"""Manifests: the list of images a stage reads, as one file of URIs with optional labels.

The canonical format is Parquet with at least a ``uri`` column and an optional ``label`` column
(string class name). Curation adds ``row_id``, ``sha256``, ``size_bytes``, ``width``, ``height``.
``.jsonl`` (one object per line), ``.csv`` (header with ``uri``) and ``.txt`` (one URI per line)
are accepted too, so a user can hand-write one. Relative URIs are resolved against the manifest's
own directory. Reading Parquet needs pyarrow (imported on use).
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from dinov2_core.utils.atomic import atomic_write_bytes
from dinov2_core.utils.uri import is_remote, read_bytes

MANIFEST_SUFFIXES = (".parquet", ".jsonl", ".csv", ".txt")


@dataclass(frozen=True)
class ManifestRecord:
    uri: str
    label: str | None = None


def _resolve(uri: str, manifest_uri: str) -> str:
    if is_remote(uri) or os.path.isabs(uri):
        return uri
    if is_remote(manifest_uri):
        return manifest_uri.rsplit("/", 1)[0] + "/" + uri
    return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(manifest_uri)), uri))


def read_manifest_table(uri: str | os.PathLike) -> list[dict[str, Any]]:
    """All rows of a manifest as dicts (every column kept), URIs resolved."""
    uri = os.fspath(uri)
    suffix = os.path.splitext(uri)[1].lower()
    if suffix not in MANIFEST_SUFFIXES:
        raise ValueError(f"manifest {uri!r}: unsupported suffix {suffix!r}; allowed: {list(MANIFEST_SUFFIXES)}")
    data = read_bytes(uri)
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as err:
            raise ImportError("reading Parquet manifests needs pyarrow: pip install pyarrow") from err
        rows = pq.read_table(io.BytesIO(data)).to_pylist()
    elif suffix == ".jsonl":
        rows = [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]
    elif suffix == ".csv":
        rows = list(csv.DictReader(io.StringIO(data.decode("utf-8"))))
    else:
        rows = [{"uri": line.strip()} for line in data.decode("utf-8").splitlines() if line.strip()]
    for index, row in enumerate(rows):
        if not row.get("uri"):
            raise ValueError(f"manifest {uri!r}: row {index} has no 'uri'")
        row["uri"] = _resolve(str(row["uri"]), uri)
        if row.get("label") == "":
            row["label"] = None
    return rows


def read_manifest(uri: str | os.PathLike) -> list[ManifestRecord]:
    """The ``(uri, label)`` records of a manifest, in file order."""
    return [
        ManifestRecord(row["uri"], None if row.get("label") is None else str(row["label"]))
        for row in read_manifest_table(uri)
    ]


def label_names(records: Iterable[ManifestRecord]) -> list[str]:
    """Sorted distinct labels; a label's index in this list is its class id."""
    return sorted({r.label for r in records if r.label is not None})


def write_manifest(rows: Sequence[dict[str, Any]] | Sequence[ManifestRecord], uri: str | os.PathLike) -> str:
    """Write rows atomically. Parquet for ``.parquet`` (pyarrow), else JSON lines."""
    uri = os.fspath(uri)
    dict_rows = [r if isinstance(r, dict) else {"uri": r.uri, "label": r.label} for r in rows]
    if uri.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist(dict_rows) if dict_rows else pa.table({"uri": pa.array([], pa.string())})
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        atomic_write_bytes(uri, buffer.getvalue())
    elif uri.endswith(".jsonl"):
        text = "".join(json.dumps(row, default=str) + "\n" for row in dict_rows)
        atomic_write_bytes(uri, text.encode("utf-8"))
    else:
        raise ValueError(f"write_manifest: {uri!r} must end with .parquet or .jsonl")
    return uri
