"""Labelled image lists for evaluation, from an ImageFolder tree or a manifest (local or remote).

A *source* is either a manifest file (``.parquet/.jsonl/.csv/.txt``, read with
:mod:`dinov2_core.data.manifest`) or a directory laid out as ``<root>/<class>/<image>``. Images are
only listed here; decoding happens during feature extraction, where corrupt files are skipped and
counted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from dinov2_core.data.manifest import MANIFEST_SUFFIXES, read_manifest_table
from dinov2_core.utils.uri import filesystem_for, is_remote, join_uri

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


@dataclass
class LabelledImages:
    """Image URIs with string labels and any extra manifest columns (e.g. ``mask_uri``, ``group``)."""

    uris: list[str]
    labels: list[str | None]
    extra: dict[str, list] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.uris)

    def subset(self, indices: np.ndarray | list[int]) -> "LabelledImages":
        idx = [int(i) for i in indices]
        return LabelledImages(
            [self.uris[i] for i in idx],
            [self.labels[i] for i in idx],
            {k: [v[i] for i in idx] for k, v in self.extra.items()},
        )

    def column(self, name: str) -> list:
        """``label`` or an extra manifest column; raises naming the available columns."""
        if name == "label":
            return self.labels
        if name not in self.extra:
            raise KeyError(f"column {name!r} not found; available: {['label', *sorted(self.extra)]}")
        return self.extra[name]


def _resolve_relative(value: str, manifest_uri: str) -> str:
    if is_remote(value) or os.path.isabs(value):
        return value
    if is_remote(manifest_uri):
        return manifest_uri.rsplit("/", 1)[0] + "/" + value
    return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(manifest_uri)), value))


def _from_manifest(uri: str) -> LabelledImages:
    rows = read_manifest_table(uri)
    uris = [row["uri"] for row in rows]
    labels = [None if row.get("label") is None else str(row["label"]) for row in rows]
    extra_keys = sorted({k for row in rows for k in row} - {"uri", "label"})
    extra = {k: [row.get(k) for row in rows] for k in extra_keys}
    if "mask_uri" in extra:  # masks are stored relative to the manifest, like image URIs
        extra["mask_uri"] = [None if m is None else _resolve_relative(str(m), uri) for m in extra["mask_uri"]]
    return LabelledImages(uris, labels, extra)


def _from_image_folder(root: str) -> LabelledImages:
    fs, base = filesystem_for(root)
    if not fs.isdir(base):
        raise FileNotFoundError(f"{root!r} is neither a manifest ({', '.join(MANIFEST_SUFFIXES)}) nor a directory")
    uris: list[str] = []
    labels: list[str | None] = []
    classes = sorted(
        os.path.basename(p.rstrip("/")) for p in fs.ls(base, detail=False) if fs.isdir(p)
    )
    for name in classes:
        files = sorted(fs.find(f"{base.rstrip('/')}/{name}"))
        for path in files:
            if not path.lower().endswith(IMAGE_SUFFIXES):
                continue
            relative = path[len(base.rstrip("/")) + 1:]
            uris.append(join_uri(root, relative) if is_remote(root) else os.path.join(os.path.abspath(root), relative))
            labels.append(name)
    if not uris:
        raise FileNotFoundError(f"ImageFolder {root!r}: no images found under <root>/<class>/")
    return LabelledImages(uris, labels)


def load_labelled_images(source: str, require_labels: bool = True) -> LabelledImages:
    """List the images of ``source`` (a manifest or an ImageFolder directory)."""
    source = os.fspath(source)
    if source.lower().endswith(MANIFEST_SUFFIXES):
        data = _from_manifest(source)
    else:
        data = _from_image_folder(source)
    if require_labels:
        missing = sum(label is None for label in data.labels)
        if missing:
            raise ValueError(f"{source}: {missing} of {len(data)} images have no label; evaluation needs labels")
    return data


def sample(data: LabelledImages, limit: int | None, seed: int) -> LabelledImages:
    """A seeded random subset of at most ``limit`` images (order kept), or ``data`` itself."""
    if limit is None or limit >= len(data):
        return data
    keep = np.sort(np.random.default_rng(seed).choice(len(data), size=limit, replace=False))
    return data.subset(keep)


def encode_labels(train: list[str | None], *others: list[str | None]) -> tuple[list[str], list[np.ndarray]]:
    """Class names (sorted union over all splits) and int64 label arrays, one per split given."""
    names = sorted({str(x) for split in (train, *others) for x in split if x is not None})
    index = {name: i for i, name in enumerate(names)}
    arrays = [np.asarray([index[str(x)] for x in split], dtype=np.int64) for split in (train, *others)]
    return names, arrays


def split_indices(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random split of ``range(n)`` into (kept, held_out) with ``round(fraction·n)`` held out
    (at least one on each side when n >= 2)."""
    held = int(round(fraction * n))
    held = min(max(held, 1), n - 1) if n >= 2 else 0
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[held:]), np.sort(perm[:held])
