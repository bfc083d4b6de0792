"""Prefect task for DINOv2 pretraining (DINO + iBOT + KoLeo) on the curated manifest.

A heavy stage: the job runs through the launcher (local subprocess or Slurm) with
``torch.distributed`` set up from submitit; the task follows ``metrics.jsonl`` while it runs.
"""

from __future__ import annotations

from typing import Any

from prefect import task

from tasks.runner import RunContext
from tasks.stage import StageSpec, task_options
from tasks.training import run_training_stage


@task(name="pretrain", task_run_name="pretrain", **task_options())
def pretrain(spec: StageSpec, run_context: RunContext) -> dict[str, Any]:
    return run_training_stage(spec, run_context)
