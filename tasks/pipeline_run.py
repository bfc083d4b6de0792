"""A pipeline run's own record: the run directory, its MLflow parent run, the stage → task table.

``<work_dir>/pipeline.yaml`` is the resolved config (what ``resume`` re-reads) and
``<work_dir>/_run.json`` links the run directory to its MLflow parent run and Prefect flow runs, so a
resumed run keeps logging into the same parent run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dinov2_core.utils.atomic import atomic_write_json, atomic_write_text
from dinov2_core.utils.config import from_dict, to_dict
from tasks.config import STAGES, PipelineConfig, validate_pipeline
from tasks.runner import RunContext
from tasks.stage import code_version, hash_inputs, read_json, read_success

RUN_FILE = "_run.json"
CONFIG_FILE = "pipeline.yaml"
RESULTS_DIR = ".prefect-results"


def stage_tasks() -> dict[str, Any]:
    """Stage name → Prefect task."""
    from tasks.curate import curate
    from tasks.dedup import dedup
    from tasks.distill import distill
    from tasks.embed import embed
    from tasks.eval import evaluate
    from tasks.highres import highres
    from tasks.ingest import ingest
    from tasks.pretrain import pretrain
    from tasks.report import report

    return {"ingest": ingest, "embed": embed, "dedup": dedup, "curate": curate, "pretrain": pretrain,
            "highres": highres, "distill": distill, "eval": evaluate, "report": report}


def stage_task(cfg: PipelineConfig, stage: str):
    """The stage's task with its results persisted under the run directory (plain ``Path`` storage)."""
    return stage_tasks()[stage].with_options(result_storage=Path(cfg.work_dir) / RESULTS_DIR)


def resolve_config(
    config: PipelineConfig | dict | None = None, config_path: str | None = None, overrides: list[str] | None = None
) -> PipelineConfig:
    """A fully validated config from a config object/dict, or a YAML path plus overrides."""
    from dinov2_core.utils.config import ConfigError
    from tasks.config import load_pipeline_config

    if config_path:
        return load_pipeline_config(config_path, overrides or [])
    if config is None:
        raise ConfigError("config: give a pipeline config or config_path (a YAML file)")
    data = to_dict(config) if not isinstance(config, dict) else config
    from dinov2_core.utils.config import apply_overrides

    cfg = from_dict(PipelineConfig, apply_overrides(data, overrides or []))
    validate_pipeline(cfg)
    return cfg


def config_hash(cfg: PipelineConfig) -> str:
    return hash_inputs(to_dict(cfg))[:16]


def start_run(cfg: PipelineConfig, flow_run_id: str | None = None) -> RunContext:
    """Create or reopen the run directory and its MLflow parent run."""
    import yaml

    os.makedirs(cfg.work_dir, exist_ok=True)
    atomic_write_text(os.path.join(cfg.work_dir, CONFIG_FILE), yaml.safe_dump(to_dict(cfg), sort_keys=False))
    record = read_json(os.path.join(cfg.work_dir, RUN_FILE)) or {}
    ctx = RunContext(
        run_name=cfg.name,
        work_dir=cfg.work_dir,
        tracking_uri=cfg.mlflow_uri if cfg.tracking.enabled else None,
        experiment=cfg.tracking.experiment,
        system_metrics=cfg.tracking.system_metrics,
        code_version=code_version(),
        config_hash=config_hash(cfg),
    )
    tracker = ctx.tracker()
    parent = record.get("mlflow_parent_run_id")
    if tracker is not None:
        if tracker.run_exists(parent):
            tracker.reopen(parent)
        else:
            parent = tracker.start_run(
                cfg.name,
                params=to_dict(cfg),
                tags={"code_version": ctx.code_version, "config_hash": ctx.config_hash, "work_dir": cfg.work_dir,
                      "pipeline": "dinov2", "prefect_flow_run_id": flow_run_id},
            )
            tracker.log_artifact(parent, os.path.join(cfg.work_dir, CONFIG_FILE))
        if flow_run_id:
            tracker.set_tags(parent, {"prefect_flow_run_id": flow_run_id})
    ctx.parent_run_id = parent
    record.update(mlflow_parent_run_id=parent, tracking_uri=ctx.tracking_uri, experiment=ctx.experiment,
                  name=cfg.name, status="running")
    record.setdefault("prefect_flow_run_ids", [])
    if flow_run_id and flow_run_id not in record["prefect_flow_run_ids"]:
        record["prefect_flow_run_ids"].append(flow_run_id)
    atomic_write_json(os.path.join(cfg.work_dir, RUN_FILE), record)
    return ctx


def finish_run(ctx: RunContext, status: str) -> None:
    """Close the MLflow parent run and record the run's final status."""
    record = read_json(os.path.join(ctx.work_dir, RUN_FILE)) or {}
    record["status"] = status
    atomic_write_json(os.path.join(ctx.work_dir, RUN_FILE), record)
    tracker = ctx.tracker()
    if tracker is not None and ctx.parent_run_id:
        tracker.end(ctx.parent_run_id, "FINISHED" if status == "completed" else "FAILED")


def finished_upstream(cfg: PipelineConfig, stage: str) -> dict[str, dict]:
    """Recorded results of the enabled stages before ``stage`` (for running one stage on its own)."""
    from dinov2_core.utils.config import ConfigError

    results = {}
    for name in STAGES[: STAGES.index(stage)]:
        if not cfg.enabled(name):
            continue
        manifest = read_success(cfg.stage_dir(name))
        if manifest is None:
            raise ConfigError(f"{name}: has not finished in {cfg.work_dir}; run it first (or set {name}.enabled=false)")
        results[name] = manifest["result"]
    return results
