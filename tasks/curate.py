"""Prefect task for retrieval-based curation (k-means clustering and balanced sampling) of the deduplicated images.

Wraps ``curation.curate.run_curate``.
"""

from __future__ import annotations

from typing import Any

from prefect import task

from tasks.runner import RunContext, run_stage
from tasks.stage import StageSpec, split_summary, task_options


@task(name="curate", task_run_name="curate", **task_options())
def curate(spec: StageSpec, run_context: RunContext) -> dict[str, Any]:
    return run_stage(spec, run_context, target="tasks.curate:execute")


def execute(config: dict[str, Any], inputs: dict[str, Any], output_uri: str, stage_dir: str) -> dict[str, Any]:
    from curation.config import CurateConfig
    from curation.curate import run_curate
    from dinov2_core.utils.config import from_dict

    summary = run_curate(from_dict(CurateConfig, config), inputs["manifest"], inputs["embeddings"], output_uri)
    return split_summary(summary, output_uri)
