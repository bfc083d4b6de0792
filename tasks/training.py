"""Job of the training stages (pretrain, highres, distill), and the loss-curve plot.

Runs wherever the launcher put it (a local subprocess or every rank of a Slurm job). The trainer
resumes from the newest complete checkpoint in its output directory, which is the directory of the
stage's identity: a requeue or a crash resumes, new inputs train anew.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

LOSS_CURVE = "loss_curve.png"


def execute(config: dict[str, Any], inputs: dict[str, Any], output_uri: str, stage_dir: str,
            run: dict[str, Any]) -> dict[str, Any]:
    from dinov2_core.train import run_training
    from dinov2_core.train.config import TrainConfig
    from dinov2_core.utils.config import from_dict

    cfg = from_dict(TrainConfig, config)
    # job logs (submitit's *_log.err) then show the trainer's progress and "resumed from ..." lines
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    summary = run_training(cfg, output_uri) or {}
    rank = int(os.environ.get("RANK", "0"))
    metrics_file = os.path.join(output_uri, "metrics.jsonl")
    artifacts = [os.path.join(output_uri, "config.yaml")]
    if rank == 0:
        plot = plot_losses(metrics_file, os.path.join(output_uri, LOSS_CURVE))
        if plot:
            artifacts.append(plot)
    export_dir = summary.get("export_dir") or os.path.join(output_uri, "export")
    # per-step values are forwarded from metrics.jsonl while the job runs; these are the final ones
    last = dict(summary.get("last_metrics") or {}, iteration=summary.get("iteration"))
    metrics = {f"final.{k}": v for k, v in last.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return {
        "outputs": {"dir": output_uri, "export_dir": str(export_dir), "metrics_file": metrics_file},
        "metrics": metrics,
        "artifacts": [p for p in artifacts if os.path.exists(p)],
    }


def plot_losses(metrics_file: str, out_path: str) -> str | None:
    """Loss curves (every ``*loss*`` column against iteration) from ``metrics.jsonl`` as a PNG."""
    try:
        with open(metrics_file, encoding="utf-8") as handle:
            rows = [json.loads(line) for line in handle if line.strip()]
    except (OSError, json.JSONDecodeError):
        return None
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from curation.plots import save_png

    keys = sorted({k for row in rows for k in row if "loss" in k and isinstance(row[k], (int, float))})
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in keys:
        points = [(row["iteration"], row[key]) for row in rows if key in row and "iteration" in row]
        if points:
            ax.plot(*zip(*points), label=key)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_png(fig, out_path)
