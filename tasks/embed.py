"""Prefect task for embedding extraction of the manifest's images with a frozen backbone, in shards.

Wraps ``curation.embed.run_embed``; it runs through the launcher (local subprocess or Slurm job).
"""

from __future__ import annotations

from typing import Any

from prefect import task

from tasks.runner import RunContext, run_stage
from tasks.stage import StageSpec, split_summary, task_options


@task(name="embed", task_run_name="embed", **task_options())
def embed(spec: StageSpec, run_context: RunContext) -> dict[str, Any]:
    return run_stage(spec, run_context, target="tasks.embed:execute", heavy=True)


def execute(config: dict[str, Any], inputs: dict[str, Any], output_uri: str, stage_dir: str) -> dict[str, Any]:
    from curation.config import EmbedConfig
    from curation.embed import run_embed
    from dinov2_core.utils.config import from_dict

    summary = run_embed(from_dict(EmbedConfig, config), inputs["manifest"], output_uri)
    return split_summary(summary, output_uri)
