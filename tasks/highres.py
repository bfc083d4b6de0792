"""Prefect task for the short high-resolution (518 px) adaptation that starts from the pretrained model.

A heavy stage: the job runs through the launcher (local subprocess or Slurm) with
``torch.distributed`` set up from submitit; the task follows ``metrics.jsonl`` while it runs.
"""

from __future__ import annotations

import os
from typing import Any

from prefect import task

from tasks.runner import RunContext, run_stage
from tasks.stage import StageSpec, task_options


@task(name="highres", task_run_name="highres", **task_options())
def highres(spec: StageSpec, run_context: RunContext) -> dict[str, Any]:
    from dinov2_core.train.config import TrainConfig
    from dinov2_core.utils.config import from_dict

    total = from_dict(TrainConfig, spec.config).max_iter + 1
    return run_stage(
        spec,
        run_context,
        target="tasks.training:execute",
        heavy=True,
        distributed=True,
        progress_total=total,
        metrics_file=os.path.join(spec.stage_dir, "metrics.jsonl"),
    )
