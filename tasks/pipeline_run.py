"""A pipeline run's own record: the run directory's lock, its MLflow parent run, its history.

Every run of the pipeline (``run``, ``resume``, a scheduled deployment run) is its own MLflow parent run,
tagged with the run directory and linked to the previous run of the same directory, so weekly
retrainings can be told apart and compared. ``<work_dir>/_run.json`` lists the runs of the directory,
each with what every stage did (reused or recomputed, and why); ``<work_dir>/pipeline.yaml`` is the
resolved config of the latest run with secrets masked. Only the flow process writes these files, under
the run directory's lock (``tasks.workdir_lock``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from dinov2_core.utils.atomic import atomic_write_json, atomic_write_text
from dinov2_core.utils.config import ConfigError, to_dict
from dinov2_core.utils.redact import redact
from tasks.config import PipelineConfig
from tasks.record import StageResult, code_version, current_record, hash_json, now, read_json
from tasks.stage_table import STAGES
from tasks.tracking import Tracker
from tasks.workdir_lock import WorkDirLock

RUN_FILE = "_run.json"
CONFIG_FILE = "pipeline.yaml"


@dataclass
class RunContext:
    """Per-run facts that never enter a stage's identity: where to track, the parent run, and what each
    stage did in this run (kept in ``_run.json`` as it happens, for ``status``)."""

    run_name: str
    work_dir: str
    tracking_uri: str | None = None
    experiment: str = "dinov2-pipeline"
    parent_run_id: str | None = None
    system_metrics: bool = True
    code_version: str = ""
    config_hash: str = ""
    run_number: int = 0
    outcomes: dict[str, dict[str, Any]] = field(default_factory=dict)

    def tracker(self) -> Tracker | None:
        return Tracker(self.tracking_uri, self.experiment) if self.tracking_uri else None

    def record(self, stage: str, **info: Any) -> None:
        """Note what ``stage`` is doing or did (running / reused / recomputed / failed, why)."""
        self.outcomes[stage] = info
        record = read_run_file(self.work_dir)
        if record.get("runs"):
            record["runs"][-1]["stages"] = dict(self.outcomes)
            _write_run_file(self.work_dir, record)


def config_hash(cfg: PipelineConfig) -> str:
    return hash_json(to_dict(cfg))[:16]


def read_run_file(work_dir: str) -> dict[str, Any]:
    return read_json(os.path.join(work_dir, RUN_FILE)) or {"runs": []}


def _write_run_file(work_dir: str, record: dict[str, Any]) -> None:
    atomic_write_json(os.path.join(work_dir, RUN_FILE), redact(record))


def start_run(cfg: PipelineConfig, flow_run_id: str | None = None, config_path: str | None = None) -> RunContext:
    """Take the run directory's lock, then open a new MLflow parent run for this pipeline run."""
    lock = WorkDirLock(cfg.work_dir).acquire()  # before anything is written, mlflow.db included
    try:
        return _open_run(cfg, flow_run_id, config_path)
    except BaseException:
        lock.release()
        raise


def _open_run(cfg: PipelineConfig, flow_run_id: str | None, config_path: str | None) -> RunContext:
    import yaml

    atomic_write_text(os.path.join(cfg.work_dir, CONFIG_FILE), yaml.safe_dump(redact(to_dict(cfg)), sort_keys=False))
    record = read_run_file(cfg.work_dir)
    runs = record.setdefault("runs", [])
    previous = runs[-1] if runs else {}
    ctx = RunContext(
        run_name=cfg.name,
        work_dir=cfg.work_dir,
        tracking_uri=cfg.mlflow_uri if cfg.tracking.enabled else None,
        experiment=cfg.tracking.experiment,
        system_metrics=cfg.tracking.system_metrics,
        code_version=code_version(),
        config_hash=config_hash(cfg),
        run_number=int(previous.get("run_number", 0)) + 1,
    )
    tracker = ctx.tracker()
    if tracker is not None:
        ctx.parent_run_id = tracker.start_run(
            f"{cfg.name} #{ctx.run_number}",
            params=to_dict(cfg),
            tags={"pipeline": "dinov2", "work_dir": cfg.work_dir, "run_number": ctx.run_number,
                  "previous_run_id": previous.get("mlflow_parent_run_id"), "code_version": ctx.code_version,
                  "config_hash": ctx.config_hash, "prefect_flow_run_id": flow_run_id},
        )
        tracker.log_artifact(ctx.parent_run_id, os.path.join(cfg.work_dir, CONFIG_FILE))
    runs.append({"run_number": ctx.run_number, "mlflow_parent_run_id": ctx.parent_run_id,
                 "prefect_flow_run_id": flow_run_id, "started_at": now(), "status": "running", "stages": {}})
    record.update(name=cfg.name, work_dir=cfg.work_dir, tracking_uri=ctx.tracking_uri, experiment=ctx.experiment,
                  mlflow_parent_run_id=ctx.parent_run_id, status="running")
    if config_path:
        record["config_path"] = os.path.abspath(config_path)
    _write_run_file(cfg.work_dir, record)
    return ctx


def finish_run(ctx: RunContext, status: str) -> None:
    """Close the MLflow parent run, record the run's final status and release the lock."""
    try:
        record = read_run_file(ctx.work_dir)
        record["status"] = status
        outcomes: dict[str, Any] = {}
        if record.get("runs"):
            record["runs"][-1].update(status=status, finished_at=now())
            outcomes = record["runs"][-1].get("stages") or {}
        _write_run_file(ctx.work_dir, record)
        tracker = ctx.tracker()
        if tracker is not None and ctx.parent_run_id:
            tracker.set_tags(ctx.parent_run_id, {
                outcome: ",".join(s for s in STAGES if (outcomes.get(s) or {}).get("outcome") == outcome)
                for outcome in ("recomputed", "reused", "failed")
            })
            tracker.end(ctx.parent_run_id, "FINISHED" if status == "completed" else "FAILED")
    finally:
        WorkDirLock(ctx.work_dir).release()


def finished_upstream(cfg: PipelineConfig, stage: str) -> dict[str, StageResult]:
    """The last finished results of the enabled stages before ``stage`` (running one stage on its own)."""
    results = {}
    for name in STAGES[: STAGES.index(stage)]:
        if not cfg.enabled(name):
            continue
        record = current_record(cfg.stage_root(name))
        if record is None:
            raise ConfigError(f"{name}: has not finished in {cfg.work_dir}; run it first (or set {name}.enabled=false)")
        results[name] = StageResult.from_dict(record["result"])
    return results


def run_status(work_dir: str) -> dict[str, Any]:
    """What ``dinov2-pipeline status`` shows: per stage, what the latest run did with it (reused or
    recomputed and why, running, or failed with its root cause), the job and its state, training progress."""
    from tasks.launch import slurm_handle
    from tasks.record import read_state

    record = read_run_file(work_dir)
    latest = (record.get("runs") or [{}])[-1]
    lock = WorkDirLock(work_dir)
    if latest.get("status") == "running" and not (lock.held_by_another_live_process() or lock.held_by_me()):
        # the run file says running, but no live process holds the directory: the run was killed
        latest = dict(latest, status="interrupted")
        record = dict(record, status="interrupted")
    stages: dict[str, dict[str, Any]] = {}
    for stage in STAGES:
        noted = (latest.get("stages") or {}).get(stage)
        current = current_record(os.path.join(work_dir, stage))
        if noted is None and current is None:
            continue
        if noted is None:  # not reached by the latest run: its last finished result
            noted = {"outcome": "finished earlier", "identity": current["identity"], "reason": ""}
        outcome = noted.get("outcome")
        if outcome == "running" and latest.get("status") != "running":
            outcome = "interrupted"
        info: dict[str, Any] = {
            "status": {"reused": "done", "recomputed": "done", "finished earlier": "done"}.get(outcome, outcome),
            "outcome": outcome, "reason": noted.get("reason", ""), "identity": noted["identity"][:16],
        }
        stage_dir = os.path.join(work_dir, stage, noted["identity"][:16])
        state = read_state(stage_dir)
        if info["status"] != "done":
            info["error"] = noted.get("error") or state.get("root_cause") or ""
        if current and current.get("identity") == noted["identity"]:
            info["finished_at"] = current.get("finished_at")
            info["seconds"] = (current.get("result") or {}).get("seconds")
        job = state.get("job")
        if job:
            tasks = int(job.get("num_tasks") or 1)
            info["job"] = f"{job['kind']} {job['job_id']}" + (f" ({tasks} tasks)" if tasks > 1 else "")
            if job["kind"] == "slurm" and info["status"] != "done":
                info["job_state"] = _job_state(job, slurm_handle)
        metrics = os.path.join(stage_dir, "metrics.jsonl")
        if info["status"] != "done" and os.path.exists(metrics):
            info["iteration"] = _last_iteration(metrics)
        stages[stage] = info
    runs = [{k: run.get(k) for k in ("run_number", "status", "started_at", "finished_at", "mlflow_parent_run_id")}
            for run in record.get("runs", [])]
    return {"run_dir": work_dir, "run": {k: v for k, v in record.items() if k != "runs"}, "runs": runs,
            "stages": stages}


def _job_state(job: dict[str, Any], slurm_handle) -> str:
    try:
        return slurm_handle(job).state()
    except Exception as err:  # sacct not reachable from here
        return f"unknown ({type(err).__name__})"


def _last_iteration(path: str) -> int | None:
    import json

    try:
        with open(path, "rb") as handle:
            lines = handle.read().splitlines()
        return json.loads(lines[-1]).get("iteration") if lines else None
    except (OSError, ValueError):
        return None
