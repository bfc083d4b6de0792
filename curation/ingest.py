"""Ingest: list raw images from any source, hash and decode-check them in parallel on dask, and write
``manifest.parquet`` (one row per usable image) and ``rejects.parquet`` (uri, reason, detail).

Unusual but decodable images (CMYK, 16-bit, palette, alpha) are kept — the loader converts them to RGB —
and counted per original mode; corrupt, truncated, empty, non-image, too large or too small files are
rejected with a reason. One bad file never stops the stage.
"""

from __future__ import annotations

import collections
import hashlib
import io
import tarfile
from typing import Any, Iterable

from PIL import Image

from dinov2_core.data.image_io import ImageDecodeError, decode_image
from dinov2_core.utils.config import ConfigError
from dinov2_core.utils.uri import filesystem_for, join_uri

from curation import sources
from curation.cluster import dask_client
from curation.config import IngestConfig
from curation.stage_io import fingerprint, finished_result, mark_finished, write_parquet

MANIFEST_COLUMNS = ("row_id", "uri", "label", "sha256", "size_bytes", "width", "height")


def _manifest_schema():
    import pyarrow as pa

    return pa.schema([("row_id", pa.int64()), ("uri", pa.string()), ("label", pa.string()),
                      ("sha256", pa.string()), ("size_bytes", pa.int64()), ("width", pa.int32()),
                      ("height", pa.int32())])


def _rejects_schema():
    import pyarrow as pa

    return pa.schema([("uri", pa.string()), ("reason", pa.string()), ("detail", pa.string())])


class _Checked:
    """Accumulates the outcome of checking a batch of files (sent back from a dask worker)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.rejects: list[dict[str, Any]] = []
        self.converted: collections.Counter = collections.Counter()

    def check(self, uri: str, label: str | None, data: bytes | Exception, max_pixels: int, min_side: int) -> None:
        if isinstance(data, Exception):
            self.rejects.append({"uri": uri, "reason": "unreadable", "detail": f"{type(data).__name__}: {data}"[:300]})
            return
        try:
            try:
                mode = Image.open(io.BytesIO(data)).mode
            except Exception:  # decode_image below names the reason
                mode = None
            image = decode_image(data, uri, max_pixels)
        except ImageDecodeError as err:
            self.rejects.append({"uri": uri, "reason": err.reason, "detail": err.detail[:300]})
            return
        width, height = image.size
        if min(width, height) < min_side:
            self.rejects.append({"uri": uri, "reason": "too_small", "detail": f"{width}x{height}"})
            return
        if mode and mode != "RGB":
            self.converted[mode] += 1
        self.rows.append({"uri": uri, "label": label, "sha256": hashlib.sha256(data).hexdigest(),
                          "size_bytes": len(data), "width": width, "height": height})

    def result(self) -> tuple[list, list, dict]:
        return self.rows, self.rejects, dict(self.converted)


def check_files(items: list[tuple[str, str | None]], max_pixels: int, min_side: int) -> tuple[list, list, dict]:
    """Read, hash and decode-check ``(uri, label)`` items (runs on a dask worker)."""
    checked = _Checked()
    remote = [uri for uri, _ in items if not sources.is_local(uri)]
    fetched: dict[str, Any] = {}
    if remote:
        fs, _ = filesystem_for(remote[0])
        paths = {uri: filesystem_for(uri)[1] for uri in remote}
        # one concurrent batch request instead of a round trip per object
        by_path = fs.cat(list(paths.values()), on_error="return")
        fetched = {uri: by_path.get(path, FileNotFoundError(path)) for uri, path in paths.items()}
    for uri, label in items:
        if uri in fetched:
            data = fetched[uri]
        else:
            try:
                with open(uri, "rb") as handle:
                    data = handle.read()
            except Exception as err:  # missing file, permissions: rejected, not fatal
                data = err
        checked.check(uri, label, data, max_pixels, min_side)
    return checked.result()


def check_tar(tar_url: str, extensions: tuple[str, ...], max_pixels: int, min_side: int) -> tuple[list, list, dict]:
    """Stream one tar shard and check every image member (runs on a dask worker)."""
    checked = _Checked()
    fs, path = filesystem_for(tar_url.replace("file://", "", 1) if tar_url.startswith("file://") else tar_url)
    try:
        with fs.open(path, "rb") as handle, tarfile.open(fileobj=handle, mode="r|*") as archive:
            for member in archive:
                if not member.isfile() or not member.name.lower().endswith(extensions):
                    continue
                uri = sources.tar_member_uri(tar_url, member.name)
                try:
                    data: bytes | Exception = archive.extractfile(member).read()
                except Exception as err:
                    data = err
                checked.check(uri, None, data, max_pixels, min_side)
    except Exception as err:  # a corrupt shard is rejected as a whole
        checked.rejects.append({"uri": tar_url, "reason": "unreadable", "detail": f"{type(err).__name__}: {err}"[:300]})
    return checked.result()


def _chunks(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _list_items(client, cfg: IngestConfig, source: str, kind: str) -> list[tuple[str, str | None]]:
    extensions = tuple(ext.lower() for ext in cfg.extensions)
    if kind == "filelist":
        return [(item.uri, item.label) for item in sources.filelist_items(source)]
    fs, root = filesystem_for(source)
    dirs, files = sources.top_level_dirs(source)
    # each top-level directory is listed by its own task: S3 listings are slow round trips
    futures = client.map(sources.find_files, [source] * len(dirs), dirs, [extensions] * len(dirs), pure=False)
    paths = [p for p in files if p.lower().endswith(extensions)]
    for listed in client.gather(futures):
        paths.extend(listed)
    imagefolder = kind == "imagefolder"
    return [(sources.plain_uri(fs, p), sources.label_for(root, p, imagefolder)) for p in sorted(paths)]


def run_ingest(cfg: IngestConfig, source: str, output_uri: str) -> dict[str, Any]:
    """List ``source``, check every image, write ``manifest.parquet`` and ``rejects.parquet`` under
    ``output_uri``. Returns output URIs and counts (images, rejects per reason, conversions per mode)."""
    source = str(source)
    kind = cfg.source_kind if cfg.source_kind != "auto" else sources.detect_kind(source)
    if kind == "filelist" and not source.lower().endswith(sources.MANIFEST_SUFFIXES):
        raise ConfigError(f"source_kind: 'filelist' needs a file ending in {list(sources.MANIFEST_SUFFIXES)}, got {source!r}")
    # the fingerprint stamps ``source`` with its current listing: added or replaced images re-ingest
    stage_fp = fingerprint(cfg, source=source, kind=kind)
    done = finished_result(output_uri, stage_fp)
    if done is not None:
        return done

    rows: list[dict[str, Any]] = []
    rejects: list[dict[str, Any]] = []
    converted: collections.Counter = collections.Counter()
    extensions = tuple(ext.lower() for ext in cfg.extensions)
    with dask_client(cfg.cluster) as client:
        if kind == "tar":
            shards = sources.tar_shards(source)
            futures = client.map(check_tar, shards, [extensions] * len(shards), [cfg.max_pixels] * len(shards),
                                 [cfg.min_side] * len(shards), pure=False)
        else:
            items = _list_items(client, cfg, source, kind)
            batches = list(_chunks(items, cfg.files_per_task))
            futures = client.map(check_files, batches, [cfg.max_pixels] * len(batches),
                                 [cfg.min_side] * len(batches), pure=False)
        for batch_rows, batch_rejects, batch_converted in client.gather(futures):
            rows.extend(batch_rows)
            rejects.extend(batch_rejects)
            converted.update(batch_converted)

    rows.sort(key=lambda r: r["uri"])
    for row_id, row in enumerate(rows):
        row["row_id"] = row_id
    rejects.sort(key=lambda r: r["uri"])
    manifest_uri = join_uri(output_uri, "manifest.parquet")
    rejects_uri = join_uri(output_uri, "rejects.parquet")
    write_parquet([{c: r[c] for c in MANIFEST_COLUMNS} for r in rows], manifest_uri, schema=_manifest_schema())
    write_parquet(rejects, rejects_uri, schema=_rejects_schema())
    result = {
        "manifest": manifest_uri,
        "rejects": rejects_uri,
        "source_kind": kind,
        "num_images": len(rows),
        "num_rejected": len(rejects),
        "rejected_by_reason": dict(collections.Counter(r["reason"] for r in rejects)),
        "converted_by_mode": dict(converted),
        "num_labels": len({r["label"] for r in rows if r["label"] is not None}),
    }
    return mark_finished(output_uri, stage_fp, result)
