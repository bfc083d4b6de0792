"""The end-to-end flow: ingest → embed → dedup → curate → pretrain → highres → distill → eval → report.

Each enabled stage is one task; a stage that already finished with the same inputs is skipped (its
``_SUCCESS.json`` or its cached Prefect result), so running the flow again on the same run directory
resumes it. Disabled stages are skipped and their consumers read the nearest enabled upstream output.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.context import FlowRunContext

from flows.hooks import cancel_jobs
from tasks import stage_configs
from tasks.config import STAGES, PipelineConfig
from tasks.pipeline_run import finish_run, resolve_config, stage_task, start_run


@flow(name="dinov2-pipeline", on_cancellation=[cancel_jobs], on_crashed=[cancel_jobs], log_prints=True)
def dinov2_pipeline(
    config: PipelineConfig | None = None,
    config_path: str | None = None,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Run (or resume) the pipeline described by ``config`` or by the YAML file ``config_path``."""
    cfg = resolve_config(config, config_path, overrides)
    run = FlowRunContext.get()
    ctx = start_run(cfg, str(run.flow_run.id) if run and run.flow_run else None)
    results: dict[str, Any] = {}
    try:
        for stage in STAGES:
            if not cfg.enabled(stage):
                continue
            spec = stage_configs.build(cfg, stage, results)
            if stage == "report":
                spec.config["parent_run_id"] = ctx.parent_run_id
            results[stage] = stage_task(cfg, stage)(spec, ctx)
    except BaseException:
        finish_run(ctx, "failed")
        raise
    finish_run(ctx, "completed")
    return results
