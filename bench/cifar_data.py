"""CIFAR-10 training JPEGs for the curation benchmarks, extracted once to /tmp (never used by tests)."""

from __future__ import annotations

import glob
import os
import tarfile

ARCHIVE = "/work/shared/data/cifar10-train.tar.gz"
DEFAULT_ROOT = "/tmp/cifar10"


def cifar10_files(root: str = DEFAULT_ROOT, archive: str = ARCHIVE) -> list[str]:
    """Sorted paths of the 50,000 CIFAR-10 training JPEGs (``root/train/<class>/<n>.jpg``)."""
    if not glob.glob(os.path.join(root, "train", "*", "*.jpg")):
        os.makedirs(root, exist_ok=True)
        with tarfile.open(archive) as tar:
            tar.extractall(root, filter="data")
    return sorted(glob.glob(os.path.join(root, "train", "*", "*.jpg")))
