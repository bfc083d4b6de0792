"""One flow per stage (each is also a deployment), plus evaluation of a given checkpoint.

A stage flow runs a single stage of a pipeline config; the stages before it must have finished in the
same run directory (their ``_SUCCESS.json`` supplies the inputs).
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.context import FlowRunContext

from flows.hooks import cancel_jobs
from tasks import stage_configs
from tasks.config import STAGES, PipelineConfig
from tasks.pipeline_run import finish_run, finished_upstream, resolve_config, stage_task, start_run


def run_one_stage(stage: str, config: PipelineConfig | None, config_path: str | None, overrides: list[str] | None) -> dict[str, Any]:
    cfg = resolve_config(config, config_path, overrides)
    results = finished_upstream(cfg, stage)
    run = FlowRunContext.get()
    ctx = start_run(cfg, str(run.flow_run.id) if run and run.flow_run else None)
    spec = stage_configs.build(cfg, stage, results)
    if stage == "report":
        spec.config["parent_run_id"] = ctx.parent_run_id
    result = stage_task(cfg, stage)(spec, ctx)
    finish_run(ctx, "completed")
    return result


def _stage_flow(stage: str):
    def stage_flow(
        config: PipelineConfig | None = None, config_path: str | None = None, overrides: list[str] | None = None
    ) -> dict[str, Any]:
        return run_one_stage(stage, config, config_path, overrides)

    stage_flow.__doc__ = f"Run only the {stage} stage of a pipeline config."
    return flow(name=f"dinov2-{stage}", on_cancellation=[cancel_jobs], on_crashed=[cancel_jobs])(stage_flow)


ingest_flow = _stage_flow("ingest")
embed_flow = _stage_flow("embed")
dedup_flow = _stage_flow("dedup")
curate_flow = _stage_flow("curate")
pretrain_flow = _stage_flow("pretrain")
highres_flow = _stage_flow("highres")
distill_flow = _stage_flow("distill")
eval_flow = _stage_flow("eval")
report_flow = _stage_flow("report")
STAGE_FLOWS = {stage: globals()[f"{stage}_flow"] for stage in STAGES}


@flow(name="dinov2-evaluate-checkpoint")
def evaluate_checkpoint(
    backbone: str,
    train: str,
    test: str,
    work_dir: str,
    options: dict[str, Any] | None = None,
    experiment: str = "dinov2-pipeline",
    tracking_uri: str | None = None,
) -> dict[str, Any]:
    """Evaluate one exported backbone (or official hub ``.pth``) on a labelled train/test pair."""
    cfg = resolve_config({
        "source": train, "work_dir": work_dir, "name": "evaluate-checkpoint",
        "ingest": {"enabled": False}, "embed": {"enabled": False}, "dedup": {"enabled": False},
        "curate": {"enabled": False}, "pretrain": {"enabled": False}, "highres": {"enabled": False},
        "distill": {"enabled": False}, "report": {"enabled": False},
        "eval": {"options": options or {}, "train_manifest": train, "val_manifest": test, "backbones": []},
        "tracking": {"experiment": experiment, "uri": tracking_uri, "log_model": False},
        "launcher": {"local_mode": "inline"},
    })
    run = FlowRunContext.get()
    ctx = start_run(cfg, str(run.flow_run.id) if run and run.flow_run else None)
    spec = stage_configs.build_checkpoint_eval(cfg, backbone)
    result = stage_task(cfg, "eval")(spec, ctx)
    finish_run(ctx, "completed")
    return result
