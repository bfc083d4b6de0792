"""Ingest: list raw images from any source, hash and decode-check them in parallel on dask, and write
``manifest.parquet`` (one row per usable image) and ``rejects.parquet`` (uri, reason, detail).

Unusual but decodable images (CMYK, 16-bit, palette, alpha) are kept — the loader converts them to RGB —
and counted per original mode; corrupt, truncated, empty, non-image, too large or too small files are
rejected with a reason, and so are odd directory entries (``curation.sources``). One bad file never
stops the stage.

A *broken file* and a *failed read* are different things: transient read failures (S3 outage,
connection reset, timeout: ``dinov2_core.utils.errors.is_transient_error``) are retried with backoff,
and reads that still fail are losses that keep the stage from being marked finished (see
:func:`run_ingest`), never "unreadable" rejects. See docs/failure-modes.md.
"""

from __future__ import annotations

import collections
import hashlib
import io
import logging
import tarfile
import time
from typing import Any, Iterable

from PIL import Image

from dinov2_core.data.image_io import ImageDecodeError, decode_image
from dinov2_core.utils.config import ConfigError
from dinov2_core.utils.errors import backoff_delay, call_with_retries, is_transient_error
from dinov2_core.utils.uri import exists, filesystem_for, join_uri

from curation import sources
from curation.cluster import dask_client
from curation.config import IngestConfig
from curation.stage_io import RESULT_FILE, fingerprint, finished_result, mark_finished, write_parquet

log = logging.getLogger(__name__)

#: rejects reason of a read that kept failing with transient errors: a loss, not a broken file
TRANSIENT_REASON = "transient_read_error"
MANIFEST_COLUMNS = ("row_id", "uri", "label", "sha256", "size_bytes", "width", "height")


def _manifest_schema():
    import pyarrow as pa

    return pa.schema([("row_id", pa.int64()), ("uri", pa.string()), ("label", pa.string()),
                      ("sha256", pa.string()), ("size_bytes", pa.int64()), ("width", pa.int32()),
                      ("height", pa.int32())])


def _rejects_schema():
    import pyarrow as pa

    return pa.schema([("uri", pa.string()), ("reason", pa.string()), ("detail", pa.string())])


class IngestIncompleteError(RuntimeError):
    """Reads lost to transient failures (an S3 outage, a network cut) exceed ``max_loss_fraction``.

    Declared transient (see :func:`dinov2_core.utils.errors.is_transient_error`): once the storage is
    back, running the stage again recomputes it."""

    transient = True


class _Checked:
    """Accumulates the outcome of checking a batch of files (sent back from a dask worker)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.rejects: list[dict[str, Any]] = []
        self.converted: collections.Counter = collections.Counter()
        self.transient_retries = 0

    def count_retries(self, count: int) -> None:
        self.transient_retries += count

    def lose(self, uri: str, err: BaseException) -> None:
        """A read that kept failing transiently: recorded as a loss, never as a broken image."""
        self.rejects.append({"uri": sources.printable(uri), "reason": TRANSIENT_REASON,
                             "detail": f"{type(err).__name__}: {err}"[:300]})

    def check(self, uri: str, label: str | None, data: bytes | BaseException, max_pixels: int, min_side: int) -> None:
        if sources.has_bad_name(uri):
            self.rejects.append(sources.skipped_entry(uri, "bad_name", "name is not UTF-8"))
            return
        if isinstance(data, BaseException):
            if is_transient_error(data):
                self.lose(uri, data)
            else:  # missing file, permission denied: a retry cannot help
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

    def result(self) -> tuple[list, list, dict, int]:
        return self.rows, self.rejects, dict(self.converted), self.transient_retries


def _read_local(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


def _fetch(items: list[tuple[str, str | None]], read_retries: int, read_backoff_s: float,
           checked: _Checked) -> dict[str, bytes | BaseException]:
    """The bytes (or the final error) of every item; transient failures are retried with backoff."""
    fetched: dict[str, bytes | BaseException] = {}
    for uri, _ in items:
        if sources.is_local(uri):
            try:
                fetched[uri] = call_with_retries(lambda: _read_local(uri), read_retries, read_backoff_s,
                                                 on_retry=lambda err, attempt: checked.count_retries(1))
            except Exception as err:  # judged (transient loss or permanent reject) by _Checked.check
                fetched[uri] = err
    remote = {uri: filesystem_for(uri)[1] for uri, _ in items if not sources.is_local(uri)}
    if not remote:
        return fetched
    fs, _ = filesystem_for(next(iter(remote)))
    pending = remote
    for attempt in range(read_retries + 1):
        try:
            # one concurrent batch request instead of a round trip per object
            by_path = fs.cat(list(pending.values()), on_error="return")
        except Exception as err:  # the whole batch failed (e.g. the endpoint is down while signing)
            by_path = {path: err for path in pending.values()}
        retry: dict[str, str] = {}
        for uri, path in pending.items():
            data = by_path.get(path, FileNotFoundError(path))
            if isinstance(data, BaseException) and is_transient_error(data) and attempt < read_retries:
                retry[uri] = path
            else:
                fetched[uri] = data
        if not retry:
            break
        checked.count_retries(len(retry))
        time.sleep(backoff_delay(attempt + 1, read_backoff_s))
        pending = retry
    return fetched


def check_files(items: list[tuple[str, str | None]], max_pixels: int, min_side: int, read_retries: int = 0,
                read_backoff_s: float = 0.0) -> tuple[list, list, dict, int]:
    """Read, hash and decode-check ``(uri, label)`` items (runs on a dask worker).

    Returns ``(rows, rejects, converted modes, transient retries)``; reads that still fail transiently
    after ``read_retries`` are rejects with reason :data:`TRANSIENT_REASON` (losses, not broken files)."""
    checked = _Checked()
    fetched = _fetch(items, read_retries, read_backoff_s, checked)
    for uri, label in items:
        checked.check(uri, label, fetched[uri], max_pixels, min_side)
    return checked.result()


def _check_tar_once(tar_url: str, extensions: tuple[str, ...], max_pixels: int, min_side: int,
                    checked: _Checked) -> None:
    fs, path = filesystem_for(tar_url.replace("file://", "", 1) if tar_url.startswith("file://") else tar_url)
    with fs.open(path, "rb") as handle, tarfile.open(fileobj=handle, mode="r|*") as archive:
        for member in archive:
            if not member.isfile() or not member.name.lower().endswith(extensions):
                continue
            # a read error inside a streamed archive loses the stream position: handled per shard
            data = archive.extractfile(member).read()
            checked.check(sources.tar_member_uri(tar_url, member.name), None, data, max_pixels, min_side)


def check_tar(tar_url: str, extensions: tuple[str, ...], max_pixels: int, min_side: int, read_retries: int = 0,
              read_backoff_s: float = 0.0) -> tuple[list, list, dict, int]:
    """Stream one tar shard and check every image member (runs on a dask worker).

    A transient failure restarts the shard (up to ``read_retries`` times); if it persists the shard is
    one loss. A permanently corrupt shard is rejected as a whole, keeping the members read before the damage."""
    retries = 0
    for attempt in range(read_retries + 1):
        checked = _Checked()
        try:
            _check_tar_once(tar_url, extensions, max_pixels, min_side, checked)
        except Exception as err:
            if is_transient_error(err):
                if attempt < read_retries:
                    retries += 1
                    time.sleep(backoff_delay(attempt + 1, read_backoff_s))
                    continue
                checked = _Checked()
                checked.lose(tar_url, err)
            else:
                checked.rejects.append({"uri": tar_url, "reason": "unreadable", "detail": f"{type(err).__name__}: {err}"[:300]})
        break
    checked.transient_retries = retries
    return checked.result()


def _chunks(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _find_files(source: str, subdir: str, extensions: tuple[str, ...], read_retries: int,
                read_backoff_s: float) -> tuple[list[str], list[dict[str, Any]]]:
    """``sources.find_files`` with transient listing failures retried (runs on a dask worker)."""
    return call_with_retries(lambda: sources.find_files(source, subdir, extensions), read_retries, read_backoff_s)


def _list_items(client, cfg: IngestConfig, source: str,
                kind: str) -> tuple[list[tuple[str, str | None]], list[dict[str, Any]]]:
    """``(uri, label)`` of every image to check, and rejects rows for odd entries skipped while listing."""
    extensions = tuple(ext.lower() for ext in cfg.extensions)
    retries, backoff = cfg.read_retries, cfg.read_backoff_s
    if kind == "filelist":
        listed = call_with_retries(lambda: sources.filelist_items(source), retries, backoff)
        return [(item.uri, item.label) for item in listed], []
    fs, root = filesystem_for(source)
    dirs, paths, skipped = call_with_retries(lambda: sources.top_level_entries(source, extensions), retries, backoff)
    # each top-level directory is listed by its own task: S3 listings are slow round trips
    n = len(dirs)
    futures = client.map(_find_files, [source] * n, dirs, [extensions] * n, [retries] * n, [backoff] * n, pure=False)
    paths = list(paths)
    for listed, listed_skipped in client.gather(futures):
        paths.extend(listed)
        skipped.extend(listed_skipped)
    imagefolder = kind == "imagefolder"
    return [(sources.plain_uri(fs, p), sources.label_for(root, p, imagefolder)) for p in sorted(paths)], skipped


def _clear_finished_mark(output_uri: str) -> None:
    """Remove a ``_RESULT.json`` left by an earlier run with another fingerprint: outputs are about to be
    rewritten, and a run that ends with losses must not leave any finished mark behind."""
    uri = join_uri(output_uri, RESULT_FILE)
    if exists(uri):
        fs, path = filesystem_for(uri)
        fs.rm(path)


def run_ingest(cfg: IngestConfig, source: str, output_uri: str) -> dict[str, Any]:
    """List ``source``, check every image, write ``manifest.parquet`` and ``rejects.parquet`` under
    ``output_uri``. Returns output URIs and counts (images, rejects per reason, conversions per mode,
    transient retries and losses).

    Transient read failures are retried (``cfg.read_retries``). Reads that still fail are *losses*:
    rejects with reason ``transient_read_error`` counted in ``transient_failures``. With any loss the
    stage is not marked finished (no ``_RESULT.json``, ``complete`` is false, so the next call
    recomputes); when losses exceed ``cfg.max_loss_fraction`` of the listed images it raises
    :class:`IngestIncompleteError` after writing its outputs for inspection.
    """
    source = str(source)
    kind = cfg.source_kind if cfg.source_kind != "auto" else sources.detect_kind(source)
    if kind == "filelist" and not source.lower().endswith(sources.MANIFEST_SUFFIXES):
        raise ConfigError(f"source_kind: 'filelist' needs a file ending in {list(sources.MANIFEST_SUFFIXES)}, got {source!r}")
    # the fingerprint stamps ``source`` with its current listing: added or replaced images re-ingest
    stage_fp = fingerprint(cfg, source=source, kind=kind)
    done = finished_result(output_uri, stage_fp)
    if done is not None:
        return done
    _clear_finished_mark(output_uri)

    rows: list[dict[str, Any]] = []
    rejects: list[dict[str, Any]] = []
    converted: collections.Counter = collections.Counter()
    transient_retries = 0
    extensions = tuple(ext.lower() for ext in cfg.extensions)
    read_args = (cfg.max_pixels, cfg.min_side, cfg.read_retries, cfg.read_backoff_s)
    with dask_client(cfg.cluster) as client:
        if kind == "tar":
            shards = call_with_retries(lambda: sources.tar_shards(source), cfg.read_retries, cfg.read_backoff_s)
            futures = client.map(check_tar, shards, [extensions] * len(shards),
                                 *[[arg] * len(shards) for arg in read_args], pure=False)
        else:
            items, skipped = _list_items(client, cfg, source, kind)
            rejects.extend(skipped)
            batches = list(_chunks(items, cfg.files_per_task))
            futures = client.map(check_files, batches, *[[arg] * len(batches) for arg in read_args], pure=False)
        for batch_rows, batch_rejects, batch_converted, batch_retries in client.gather(futures):
            rows.extend(batch_rows)
            rejects.extend(batch_rejects)
            converted.update(batch_converted)
            transient_retries += batch_retries

    rows.sort(key=lambda r: r["uri"])
    for row_id, row in enumerate(rows):
        row["row_id"] = row_id
    rejects.sort(key=lambda r: r["uri"])
    manifest_uri = join_uri(output_uri, "manifest.parquet")
    rejects_uri = join_uri(output_uri, "rejects.parquet")
    write_parquet([{c: r[c] for c in MANIFEST_COLUMNS} for r in rows], manifest_uri, schema=_manifest_schema())
    write_parquet(rejects, rejects_uri, schema=_rejects_schema())
    losses = sum(1 for r in rejects if r["reason"] == TRANSIENT_REASON)
    listed = len(rows) + len(rejects)
    loss_fraction = losses / listed if listed else 0.0
    result = {
        "manifest": manifest_uri,
        "rejects": rejects_uri,
        "source_kind": kind,
        "num_images": len(rows),
        "num_rejected": len(rejects),
        "rejected_by_reason": dict(collections.Counter(r["reason"] for r in rejects)),
        "converted_by_mode": dict(converted),
        "num_labels": len({r["label"] for r in rows if r["label"] is not None}),
        "transient_retries": transient_retries,
        "transient_failures": losses,
        "loss_fraction": loss_fraction,
        "complete": losses == 0,
    }
    if losses == 0:
        return mark_finished(output_uri, stage_fp, result)
    unit = "tar shards" if kind == "tar" else "images"
    message = (f"ingest of {source!r}: {losses} of {listed} {unit} ({loss_fraction:.2%}) could not be read after "
               f"{cfg.read_retries} retries (transient errors such as a storage outage; see reason "
               f"{TRANSIENT_REASON!r} in {rejects_uri})")
    if loss_fraction > cfg.max_loss_fraction:
        raise IngestIncompleteError(f"{message}; more than max_loss_fraction={cfg.max_loss_fraction:.2%}, so the "
                                    "stage failed and is not marked finished: run it again once the storage answers")
    log.warning("%s; within max_loss_fraction=%.2f%%, outputs written but the stage is not marked finished, "
                "so the next run recomputes it", message, 100 * cfg.max_loss_fraction)
    return result
