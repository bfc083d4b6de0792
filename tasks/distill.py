"""Prefect task for distillation of the high-resolution teacher into a smaller student.

A heavy stage: the job runs through the launcher (local subprocess or Slurm) with
``torch.distributed`` set up from submitit; the task follows ``metrics.jsonl`` while it runs.
"""

from __future__ import annotations

from typing import Any

from prefect import task

from tasks.runner import RunContext
from tasks.stage import StageSpec, task_options
from tasks.training import run_training_stage


@task(name="distill", task_run_name="distill", **task_options())
def distill(spec: StageSpec, run_context: RunContext) -> dict[str, Any]:
    return run_training_stage(spec, run_context)
