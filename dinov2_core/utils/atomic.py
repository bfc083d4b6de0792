"""Atomic writes: a killed process never leaves a half-written file that later looks complete.

Local files are written to a temporary sibling and renamed into place (``os.replace`` is atomic on
POSIX). Object stores (``s3://``) are written with a single PUT, which is atomic by itself.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from dinov2_core.utils.uri import filesystem_for, is_remote


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` (local path or fsspec URI) so that readers see all or nothing."""
    path = os.fspath(path)
    if is_remote(path):
        fs, fs_path = filesystem_for(path)
        fs.pipe(fs_path, data)
        return
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + os.path.basename(path), dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`atomic_write_bytes`."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def atomic_rename_dir(tmp_dir: str | os.PathLike, final_dir: str | os.PathLike) -> None:
    """Publish a fully written local directory under its final name in one rename."""
    final_dir = Path(final_dir)
    if final_dir.exists():
        raise FileExistsError(f"{final_dir} already exists; refusing to overwrite a published directory")
    os.replace(tmp_dir, final_dir)
