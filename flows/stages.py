"""One flow per stage (each is also a deployment), plus evaluation of a given checkpoint.

A stage flow runs a single stage of a pipeline config against the last finished results of the stages
before it in the same run directory.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.context import FlowRunContext

from flows.hooks import cancel_jobs
from tasks import wiring
from tasks.config import PipelineConfig
from tasks.pipeline_run import finish_run, finished_upstream, start_run
from tasks.prefect_task import stage_task
from tasks.record import StageResult
from tasks.stage_table import STAGES


def _flow_run_id() -> str | None:
    run = FlowRunContext.get()
    return str(run.flow_run.id) if run and run.flow_run else None


def run_one_stage(stage: str, config: PipelineConfig | None, config_path: str | None,
                  overrides: list[str] | None) -> StageResult:
    cfg = wiring.resolve_config(config, config_path, overrides)
    results = finished_upstream(cfg, stage)
    ctx = start_run(cfg, _flow_run_id(), config_path)
    try:
        spec = wiring.build(cfg, stage, results, run={"parent_run_id": ctx.parent_run_id})
        result = stage_task(stage)(spec, ctx)
    except BaseException:
        finish_run(ctx, "failed")
        raise
    finish_run(ctx, "completed")
    return result


def _stage_flow(stage: str):
    def stage_flow(
        config: PipelineConfig | None = None, config_path: str | None = None, overrides: list[str] | None = None
    ) -> StageResult:
        return run_one_stage(stage, config, config_path, overrides)

    stage_flow.__doc__ = f"Run only the {stage} stage of a pipeline config."
    return flow(name=f"dinov2-{stage}", on_cancellation=[cancel_jobs], on_crashed=[cancel_jobs])(stage_flow)


STAGE_FLOWS = {stage: _stage_flow(stage) for stage in STAGES}
ingest_flow = STAGE_FLOWS["ingest"]
embed_flow = STAGE_FLOWS["embed"]
dedup_flow = STAGE_FLOWS["dedup"]
curate_flow = STAGE_FLOWS["curate"]
pretrain_flow = STAGE_FLOWS["pretrain"]
highres_flow = STAGE_FLOWS["highres"]
distill_flow = STAGE_FLOWS["distill"]
eval_flow = STAGE_FLOWS["eval"]
report_flow = STAGE_FLOWS["report"]


@flow(name="dinov2-evaluate-checkpoint")
def evaluate_checkpoint(
    backbone: str,
    train: str,
    test: str,
    work_dir: str,
    options: dict[str, Any] | None = None,
    experiment: str = "dinov2-pipeline",
    tracking_uri: str | None = None,
) -> StageResult:
    """Evaluate one exported backbone (or official hub ``.pth``) on a labelled train/test pair."""
    cfg = wiring.resolve_config({
        "source": train, "work_dir": work_dir, "name": "evaluate-checkpoint",
        "ingest": {"enabled": False}, "embed": {"enabled": False}, "dedup": {"enabled": False},
        "curate": {"enabled": False}, "pretrain": {"enabled": False}, "highres": {"enabled": False},
        "distill": {"enabled": False}, "report": {"enabled": False},
        "eval": {"options": options or {}, "train_manifest": train, "val_manifest": test, "backbones": []},
        "tracking": {"experiment": experiment, "uri": tracking_uri, "log_model": False},
        "launcher": {"local_mode": "inline"},
    })
    ctx = start_run(cfg, _flow_run_id())
    try:
        result = stage_task("eval")(wiring.build_checkpoint_eval(cfg, backbone), ctx)
    except BaseException:
        finish_run(ctx, "failed")
        raise
    finish_run(ctx, "completed")
    return result
