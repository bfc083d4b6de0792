"""Job of the frozen-feature evaluation of the exported backbones (kNN, linear, PCA maps, baselines).

One ``run_evaluation`` per backbone listed in ``eval.backbones``, each into ``<output>/<stage>/``. It goes
through the launcher like the training stages (feature extraction wants the GPU). In a job of several
tasks only rank 0 evaluates: the features of a frozen backbone on a benchmark-sized set fit one GPU, and
N tasks must never extract them N times into the same files.
"""

from __future__ import annotations

import glob
import os
from typing import Any


def execute(config: dict[str, Any], inputs: dict[str, Any], output_uri: str, stage_dir: str,
            run: dict[str, Any]) -> dict[str, Any] | None:
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    from dinov2_core.eval import run_evaluation
    from dinov2_core.eval.config import EvalConfig
    from dinov2_core.utils.config import from_dict

    outputs: dict[str, Any] = {"dir": output_uri}
    metrics: dict[str, Any] = {}
    artifacts: list[str] = []
    for name, eval_cfg in config["evals"].items():
        out_dir = os.path.join(output_uri, name)
        summary = run_evaluation(from_dict(EvalConfig, eval_cfg), out_dir, title=name)
        metrics[name] = summary["metrics"]
        files = summary.get("files", {})
        outputs[name] = {
            "metrics_json": files.get("metrics", ""),
            "report": files.get("report", ""),
            "pca_maps": sorted(glob.glob(os.path.join(out_dir, "pca_*.png"))),
        }
        artifacts += [p for p in (files.get("metrics"), files.get("report"), files.get("details")) if p and os.path.exists(p)]
        artifacts += outputs[name]["pca_maps"]
    return {"outputs": outputs, "metrics": metrics, "artifacts": artifacts}
