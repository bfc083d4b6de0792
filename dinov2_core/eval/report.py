"""The Markdown summary of an evaluation: one row per model (backbone, random init, raw pixels).

Reads the flat metric keys written to ``metrics.json``: the backbone's without prefix
(``knn.top1.k20``), baselines under ``baseline_random.`` and ``baseline_pixels.``.
"""

from __future__ import annotations

ROWS = (("backbone", ""), ("random init", "baseline_random."), ("raw pixels", "baseline_pixels."))


def _columns(metrics: dict[str, float], knn_ks: list[int]) -> list[tuple[str, str, bool]]:
    """(header, metric key, is_percentage) for every metric present for at least one row."""
    candidates = [(f"kNN top-1 (k={k})", f"knn.top1.k{k}", True) for k in knn_ks]
    candidates += [
        ("linear top-1", "linear.top1", True),
        ("logreg top-1", "logreg.top1", True),
        ("retrieval mAP", "retrieval.map", True),
        ("retrieval R@1", "retrieval.recall@1", True),
        ("dense mIoU", "dense.miou", True),
    ]
    return [c for c in candidates if any(prefix + c[1] in metrics for _, prefix in ROWS)]


def markdown_table(metrics: dict[str, float], knn_ks: list[int] = (10, 20, 100, 200), title: str = "backbone") -> str:
    """A Markdown table; values in percent with one decimal, ``—`` where a metric was not computed."""
    columns = _columns(metrics, list(knn_ks))
    lines = ["| model | " + " | ".join(c[0] for c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, prefix in ROWS:
        if not any(prefix + c[1] in metrics for c in columns):
            continue
        cells = []
        for _, key, percent in columns:
            value = metrics.get(prefix + key)
            cells.append("—" if value is None else (f"{100 * value:.1f}" if percent else f"{value:.4g}"))
        lines.append(f"| {title if prefix == '' else name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def report_markdown(
    metrics: dict[str, float],
    knn_ks: list[int],
    title: str,
    data_lines: list[str],
    pca_files: list[str],
) -> str:
    parts = [f"# Evaluation: {title}\n", "\n", markdown_table(metrics, knn_ks, title), "\n"]
    if data_lines:
        parts += ["## Data\n", "\n", *[f"- {line}\n" for line in data_lines], "\n"]
    if pca_files:
        parts += ["## PCA feature maps\n", "\n",
                  "Each test image beside the first three principal components of its patch features as RGB; "
                  "background patches (first component below the threshold) are black.\n", "\n",
                  *[f"![{name}]({name})\n" for name in pca_files]]
    return "".join(parts)
