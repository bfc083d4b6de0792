"""Prefect task for ingestion: raw images (folder, s3:// prefix, ImageFolder, file list, tar shards) to a manifest, corrupt images counted and skipped.

Wraps ``curation.ingest.run_ingest``.
"""

from __future__ import annotations

from typing import Any

from prefect import task

from tasks.runner import RunContext, run_stage
from tasks.stage import StageSpec, split_summary, task_options


@task(name="ingest", task_run_name="ingest", **task_options())
def ingest(spec: StageSpec, run_context: RunContext) -> dict[str, Any]:
    return run_stage(spec, run_context, target="tasks.ingest:execute")


def execute(config: dict[str, Any], inputs: dict[str, Any], output_uri: str, stage_dir: str) -> dict[str, Any]:
    from curation.config import IngestConfig
    from curation.ingest import run_ingest
    from dinov2_core.utils.config import from_dict

    summary = run_ingest(from_dict(IngestConfig, config), inputs["source"], output_uri)
    return split_summary(summary, output_uri)
