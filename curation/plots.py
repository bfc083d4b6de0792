"""PNG figures of the curation stages: example duplicate groups and cluster-size distributions."""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np

from dinov2_core.data.image_io import ImageDecodeError, load_image
from dinov2_core.utils.atomic import atomic_write_bytes


def save_png(fig, uri: str) -> str:
    """Write a matplotlib figure as PNG to a local path or URI, atomically, and close it."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(uri, buffer.getvalue())
    return uri


def duplicate_groups_png(groups: Sequence[Sequence[tuple[str, str]]], uri: str, max_members: int = 6) -> str:
    """One row per group: ``(uri, caption)`` pairs, the kept image first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(1, len(groups))
    fig, axes = plt.subplots(rows, max_members, figsize=(1.8 * max_members, 1.9 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    if not groups:
        axes[0, 0].text(0, 0.5, "no duplicate groups", fontsize=10)
    for r, group in enumerate(groups):
        for c, (image_uri, caption) in enumerate(list(group)[:max_members]):
            try:
                image = load_image(image_uri)
                image.thumbnail((128, 128))
                axes[r, c].imshow(np.asarray(image))
            except ImageDecodeError:
                axes[r, c].text(0.1, 0.5, "unreadable", fontsize=8)
            axes[r, c].set_title(caption, fontsize=7)
    return save_png(fig, uri)


def cluster_sizes_png(series: dict[str, np.ndarray], uri: str, title: str) -> str:
    """Sorted cluster sizes (log scale), one line per named series (e.g. before / after sampling)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, sizes in series.items():
        sizes = np.sort(np.asarray(sizes))[::-1]
        ax.plot(np.arange(1, len(sizes) + 1), np.maximum(sizes, 0.8), label=f"{name} (n={int(sizes.sum())})")
    ax.set_yscale("log")
    ax.set_xlabel("cluster rank")
    ax.set_ylabel("images in cluster")
    ax.set_title(title)
    ax.legend()
    return save_png(fig, uri)
