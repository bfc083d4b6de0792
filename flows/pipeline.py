"""The end-to-end flow: ingest → embed → dedup → curate → pretrain → highres → distill → eval → report.

Each enabled stage is one task. A stage whose result identity already finished is reused, anything whose
inputs changed is recomputed (``tasks.record``), so running the flow again on the same run directory
resumes a failed run or retrains exactly what new data or a new config calls for. Disabled stages are
skipped and their consumers read the nearest enabled upstream output.
"""

from __future__ import annotations

from prefect import flow
from prefect.context import FlowRunContext

from flows.hooks import cancel_jobs
from tasks import wiring
from tasks.config import PipelineConfig
from tasks.pipeline_run import finish_run, start_run
from tasks.prefect_task import stage_task
from tasks.record import StageResult


@flow(name="dinov2-pipeline", on_cancellation=[cancel_jobs], on_crashed=[cancel_jobs], log_prints=True)
def dinov2_pipeline(
    config: PipelineConfig | None = None,
    config_path: str | None = None,
    overrides: list[str] | None = None,
) -> dict[str, StageResult]:
    """Run (or resume) the pipeline described by ``config`` or by the YAML file ``config_path``."""
    cfg = wiring.resolve_config(config, config_path, overrides)
    run = FlowRunContext.get()
    ctx = start_run(cfg, str(run.flow_run.id) if run and run.flow_run else None, config_path)
    results: dict[str, StageResult] = {}
    try:
        for stage in wiring.enabled_stages(cfg):
            spec = wiring.build(cfg, stage, results, run={"parent_run_id": ctx.parent_run_id})
            results[stage] = stage_task(stage)(spec, ctx)
    except BaseException:
        finish_run(ctx, "failed")
        raise
    finish_run(ctx, "completed")
    return results
