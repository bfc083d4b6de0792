"""Where raw images come from: a local directory or ``s3://`` prefix, an ImageFolder tree, a file list,
or tar shards. Listing yields :class:`SourceItem` entries that ingest then reads, hashes and decodes.

Tar members are addressed as ``tar://<member>::<tar URL>`` (fsspec URL chaining), which
``dinov2_core.data.image_io.load_image`` reads directly.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass

from dinov2_core.data.manifest import MANIFEST_SUFFIXES, read_manifest_table
from dinov2_core.utils.uri import filesystem_for, is_remote


@dataclass(frozen=True)
class SourceItem:
    uri: str
    label: str | None = None


def protocol_url(fs, path: str) -> str:
    """The full URL of ``path`` on ``fs`` (``file:///abs`` for local files, ``s3://bucket/key``)."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("file", "local"):
        return "file://" + os.path.abspath(path)
    return f"{protocol}://{path}"


def plain_uri(fs, path: str) -> str:
    """The URI manifests store: an absolute local path, or ``s3://bucket/key``."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return os.path.abspath(path) if protocol in ("file", "local") else f"{protocol}://{path}"


def tar_member_uri(tar_url: str, member: str) -> str:
    return f"tar://{member}::{tar_url}"


def detect_kind(source: str) -> str:
    """``filelist`` / ``tar`` / ``imagefolder`` / ``directory`` for ``source`` (ingest ``source_kind: auto``)."""
    lower = source.lower()
    if lower.endswith(MANIFEST_SUFFIXES):
        return "filelist"
    if lower.endswith(".tar"):
        return "tar"
    fs, root = filesystem_for(source)
    if not fs.isdir(root):
        raise FileNotFoundError(f"ingest source {source!r} is neither a directory/prefix nor a file list or .tar")
    entries = fs.ls(root, detail=True)
    files = [e for e in entries if e["type"] == "file"]
    dirs = [e for e in entries if e["type"] == "directory"]
    if files and all(e["name"].lower().endswith(".tar") for e in files) and not dirs:
        return "tar"
    if dirs and not files:
        return "imagefolder"
    return "directory"


def top_level_dirs(source: str) -> tuple[list[str], list[str]]:
    """``(subdirectories, files directly under source)`` as filesystem paths."""
    fs, root = filesystem_for(source)
    entries = fs.ls(root, detail=True)
    dirs = sorted(e["name"] for e in entries if e["type"] == "directory")
    files = sorted(e["name"] for e in entries if e["type"] == "file")
    return dirs, files


def find_files(source: str, subdir: str | None, extensions: tuple[str, ...]) -> list[str]:
    """All files with one of ``extensions`` below ``subdir`` (a path on ``source``'s filesystem)."""
    fs, root = filesystem_for(source)
    found = fs.find(subdir or root)
    return sorted(p for p in found if p.lower().endswith(extensions))


def label_for(root: str, path: str, imagefolder: bool) -> str | None:
    if not imagefolder:
        return None
    relative = posixpath.relpath(path.replace(os.sep, "/"), root.replace(os.sep, "/"))
    parts = relative.split("/")
    return parts[0] if len(parts) >= 2 else None


def filelist_items(source: str) -> list[SourceItem]:
    rows = read_manifest_table(source)
    return [SourceItem(row["uri"], None if row.get("label") is None else str(row["label"])) for row in rows]


def tar_shards(source: str) -> list[str]:
    """The tar shard URLs of ``source`` (one .tar, or a directory/prefix of .tar files)."""
    fs, root = filesystem_for(source)
    if source.lower().endswith(".tar"):
        return [protocol_url(fs, root)]
    return [protocol_url(fs, p) for p in sorted(fs.find(root)) if p.lower().endswith(".tar")]


def is_local(source: str) -> bool:
    return not is_remote(source)


def listing_digest(source: str) -> str:
    """A hash of what ``source`` holds now: every file's path, size and modification stamp.

    Every stage fingerprints its inputs with it (``stage_io.content_identity``), so a scheduled re-run
    notices images that were added, removed or replaced under an unchanged source URI and re-ingests,
    and each stage after ingest notices that its input was rewritten at the same URI.
    """
    import hashlib

    fs, root = filesystem_for(source)
    # object-store filesystems cache listings per process; another process may have rewritten the objects
    fs.invalidate_cache(root)
    info = fs.info(root)
    entries = fs.find(root, detail=True) if info.get("type") == "directory" else {root: info}
    digest = hashlib.sha256()
    for path in sorted(entries):
        detail = entries[path]
        stamp = detail.get("ETag") or detail.get("mtime") or detail.get("LastModified") or detail.get("last_modified")
        digest.update(f"{path}\t{detail.get('size')}\t{stamp}\n".encode("utf-8"))
    return digest.hexdigest()
