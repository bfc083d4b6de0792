"""Where raw images come from: a local directory or ``s3://`` prefix, an ImageFolder tree, a file list,
or tar shards. Listing yields :class:`SourceItem` entries that ingest then reads, hashes and decodes.

Tar members are addressed as ``tar://<member>::<tar URL>`` (fsspec URL chaining), which
``dinov2_core.data.image_io.load_image`` reads directly.

Local directories are walked here (not by fsspec) so that odd entries are reported, never silently
dropped: an image-named entry that is not a regular file (``not_a_file``, e.g. a directory ``x.jpg``,
which is still descended into), a symlink that loops or points back into the tree above it
(``symlink_loop``), a broken symlink (``broken_symlink``), a symlinked directory already listed under its
real path (``duplicate_link``), a name that is not valid UTF-8 (``bad_name``: Parquet stores UTF-8 only;
the reported URI shows the raw bytes as ``\\xNN``) and a directory that cannot be listed (``unreadable``).
"""

from __future__ import annotations

import errno
import os
import posixpath
import stat
from dataclasses import dataclass
from typing import Any

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


def top_level_entries(source: str, extensions: tuple[str, ...]) -> tuple[list[str], list[str], list[dict[str, Any]]]:
    """``(subdirectories, image files directly under source, skipped entries)`` as filesystem paths."""
    if is_local(source):
        _, root = filesystem_for(source)
        files, dirs, skipped = scan_local(root, root, extensions, recursive=False)
        return dirs, files, skipped
    dirs, files = top_level_dirs(source)
    return dirs, [p for p in files if p.lower().endswith(extensions)], []


def top_level_dirs(source: str) -> tuple[list[str], list[str]]:
    """``(subdirectories, files directly under source)`` as filesystem paths."""
    fs, root = filesystem_for(source)
    entries = fs.ls(root, detail=True)
    dirs = sorted(e["name"] for e in entries if e["type"] == "directory")
    files = sorted(e["name"] for e in entries if e["type"] == "file")
    return dirs, files


def printable(path: str) -> str:
    """``path`` as valid UTF-8 text: bytes of a non-UTF-8 file name (surrogate-escaped by Python) as ``\\xNN``."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def has_bad_name(path: str) -> bool:
    """Whether ``path`` holds bytes that are not UTF-8 (so no manifest can store it)."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def skipped_entry(path: str, reason: str, detail: str) -> dict[str, Any]:
    """A rejects row for a listed entry that is not ingested."""
    return {"uri": printable(path), "reason": reason, "detail": printable(detail)[:300]}


def _is_within(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


def scan_local(directory: str, root: str, extensions: tuple[str, ...],
               recursive: bool = True) -> tuple[list[str], list[str], list[dict[str, Any]]]:
    """Walk a local ``directory`` (inside source ``root``): ``(image files, subdirectories, skipped)``.

    With ``recursive`` subdirectories are walked and the second list is empty; without it they are
    returned for the caller to walk (ImageFolder classes are listed by separate tasks). ``skipped`` holds
    rejects rows for odd entries (see the module docstring); files without an image extension are
    ignored as before.
    """
    real_root = os.path.realpath(root)
    files: list[str] = []
    subdirs: list[str] = []
    skipped: list[dict[str, Any]] = []
    pending = [directory]
    while pending:
        current = pending.pop()
        real_current = os.path.realpath(current)
        try:
            with os.scandir(current) as listing:
                entries = sorted(listing, key=lambda entry: entry.name)
        except OSError as err:
            skipped.append(skipped_entry(current, "unreadable", f"cannot list directory: {err.strerror or err}"))
            continue
        for entry in entries:
            path = entry.path
            image_named = entry.name.lower().endswith(extensions)
            is_link = entry.is_symlink()
            try:
                info = os.stat(path)  # follows symlinks
            except OSError as err:
                if err.errno == errno.ELOOP:
                    skipped.append(skipped_entry(path, "symlink_loop", "symbolic link resolves to itself"))
                elif is_link:
                    skipped.append(skipped_entry(path, "broken_symlink", f"-> {os.readlink(path)}"))
                elif image_named:
                    skipped.append(skipped_entry(path, "unreadable", err.strerror or str(err)))
                continue
            if stat.S_ISDIR(info.st_mode):
                if has_bad_name(path):
                    skipped.append(skipped_entry(path, "bad_name", "directory name is not UTF-8; not descended"))
                    continue
                if is_link:
                    target = os.path.realpath(path)
                    if _is_within(real_current, target):
                        skipped.append(skipped_entry(path, "symlink_loop", f"-> {target}, a directory above it"))
                        continue
                    if _is_within(target, real_root):
                        skipped.append(skipped_entry(path, "duplicate_link", f"-> {target}, listed under its own path"))
                        continue
                if image_named:
                    skipped.append(skipped_entry(path, "not_a_file", "a directory named like an image; its contents are listed"))
                (pending if recursive else subdirs).append(path)
            elif not image_named:
                continue
            elif has_bad_name(path):
                skipped.append(skipped_entry(path, "bad_name", "file name is not UTF-8"))
            elif stat.S_ISREG(info.st_mode):
                files.append(path)
            else:
                skipped.append(skipped_entry(path, "not_a_file", "not a regular file (fifo, socket or device)"))
    return sorted(files), sorted(subdirs), skipped


def find_files(source: str, subdir: str | None, extensions: tuple[str, ...]) -> tuple[list[str], list[dict[str, Any]]]:
    """All files with one of ``extensions`` below ``subdir`` (a path on ``source``'s filesystem), and
    rejects rows for the odd entries skipped (local sources only; object stores hold plain keys)."""
    fs, root = filesystem_for(source)
    if is_local(source):
        files, _, skipped = scan_local(subdir or root, root, extensions)
        return files, skipped
    found = fs.find(subdir or root)
    return sorted(p for p in found if p.lower().endswith(extensions)), []


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
        # a local file name need not be UTF-8: Python hands its raw bytes over as surrogates
        digest.update(f"{path}\t{detail.get('size')}\t{stamp}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()
