"""CIFAR-10 training JPEGs for the benchmarks (never used by tests): the shared archive is found next to
the checkout (``<repo>/../shared/data/cifar10-train.tar.gz``) unless a path is given, and extracted
once to the system temporary directory."""

from __future__ import annotations

import glob
import os
import tarfile
import tempfile
from pathlib import Path

#: the shared data folder sits beside the repository checkout
ARCHIVE = str(Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "cifar10-train.tar.gz")
DEFAULT_ROOT = os.path.join(tempfile.gettempdir(), "cifar10")


def extract_cifar10(root: str = DEFAULT_ROOT, archive: str = ARCHIVE) -> str:
    """Extract ``archive`` under ``root`` unless already done; returns ``root/train`` (``<class>/<n>.jpg``)."""
    if not glob.glob(os.path.join(root, "train", "*", "*.jpg")):
        if not os.path.exists(archive):
            raise FileNotFoundError(f"CIFAR-10 archive not found: {archive} (pass its path with --archive)")
        os.makedirs(root, exist_ok=True)
        with tarfile.open(archive) as tar:
            tar.extractall(root, filter="data")
    return os.path.join(root, "train")


def cifar10_files(root: str = DEFAULT_ROOT, archive: str = ARCHIVE) -> list[str]:
    """Sorted paths of the 50,000 CIFAR-10 training JPEGs (``root/train/<class>/<n>.jpg``)."""
    return sorted(glob.glob(os.path.join(extract_cifar10(root, archive), "*", "*.jpg")))
