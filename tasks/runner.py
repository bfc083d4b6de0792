"""Run one stage: skip it if finished, else re-attach to or submit its job, follow it, record it.

The order of events for a stage, whatever the launcher:

1. ``_SUCCESS.json`` matches the inputs → return its recorded result (nothing recomputed).
2. Open (or re-open, on resume) the stage's MLflow child run; ``_state.json`` says ``running``.
3. Heavy stage: re-attach to a still-running job recorded in ``_state.json``, else submit a new one;
   poll it, forwarding new ``metrics.jsonl`` rows to MLflow and the progress artifact. Light stage:
   call the entry point in this process.
4. Write ``_SUCCESS.json`` (last, atomically), log metrics/artifacts, close the child run, publish the
   stage's summary artifact.

If the flow is cancelled or interrupted while a job runs, the job is cancelled; if the flow process is
killed outright the job keeps running and the next run re-attaches to it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Any

from tasks import artifacts
from tasks.config import LauncherConfig, Resources
from tasks.launch import StageJob, make_launcher, resources_dict, wait
from tasks.stage import (
    StageSpec,
    finished_result,
    read_state,
    write_state,
    write_success,
)
from tasks.tracking import MetricsForwarder, Tracker


@dataclass
class RunContext:
    """Per-run facts that must not affect caching: where to track, which parent run, which flow run."""

    run_name: str
    work_dir: str
    tracking_uri: str | None = None
    experiment: str = "dinov2-pipeline"
    parent_run_id: str | None = None
    system_metrics: bool = True
    code_version: str = ""
    config_hash: str = ""

    def tracker(self) -> Tracker | None:
        return Tracker(self.tracking_uri, self.experiment) if self.tracking_uri else None


def _logger():
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        import logging

        return logging.getLogger("tasks")


def _flow_run_id() -> str | None:
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    return str(ctx.flow_run.id) if ctx and ctx.flow_run else None


def _child_run(tracker: Tracker | None, spec: StageSpec, ctx: RunContext) -> str | None:
    """The stage's MLflow child run: the one from an interrupted attempt if it still exists."""
    if tracker is None:
        return None
    previous = read_state(spec.stage_dir).get("mlflow_run_id")
    if previous and tracker.run_exists(previous):
        tracker.reopen(previous)
        return previous
    run_id = tracker.start_run(
        spec.stage,
        params={"config": spec.config, "inputs": spec.inputs, "launcher": spec.launcher},
        tags={
            "stage": spec.stage,
            "code_version": ctx.code_version,
            "config_hash": ctx.config_hash,
            "input_hash": spec.input_hash(),
            "prefect_flow_run_id": _flow_run_id(),
            "work_dir": ctx.work_dir,
        },
        parent_id=ctx.parent_run_id,
    )
    write_state(spec.stage_dir, mlflow_run_id=run_id)
    return run_id


def run_stage(
    spec: StageSpec,
    ctx: RunContext,
    target: str,
    heavy: bool = False,
    distributed: bool = False,
    progress_total: int | None = None,
    metrics_file: str | None = None,
) -> dict[str, Any]:
    """Run ``target(config=..., inputs=..., output_uri=..., stage_dir=...)`` as stage ``spec.stage``."""
    log = _logger()
    done = finished_result(spec)
    if done is not None:
        log.info("%s: finished earlier with the same inputs (%s); skipping", spec.stage, spec.stage_dir)
        return done

    os.makedirs(spec.stage_dir, exist_ok=True)
    started = time.time()
    write_state(spec.stage_dir, status="running", started_at=time.strftime("%Y-%m-%dT%H:%M:%S"), error=None,
                prefect_flow_run_id=_flow_run_id())
    tracker = ctx.tracker()
    run_id = _child_run(tracker, spec, ctx)
    job = StageJob(
        target,
        {"config": spec.config, "inputs": spec.inputs, "output_uri": spec.output_uri, "stage_dir": spec.stage_dir},
        distributed=distributed,
    )
    try:
        with (tracker.system_metrics(run_id, ctx.system_metrics) if tracker and run_id else contextlib.nullcontext()):
            if heavy:
                result = _run_through_launcher(spec, ctx, job, tracker, run_id, progress_total, metrics_file)
            else:
                result = job()
    except BaseException as exc:
        write_state(spec.stage_dir, status="failed", error=f"{type(exc).__name__}: {str(exc)[:2000]}")
        if tracker and run_id:
            tracker.end(run_id, "KILLED" if not isinstance(exc, Exception) else "FAILED")
        raise

    result = dict(result)
    result["input_hash"] = spec.input_hash()
    result.setdefault("metrics", {})
    result["seconds"] = round(time.time() - started, 2)
    if tracker and run_id:
        tracker.log_metrics(run_id, {"stage_seconds": result["seconds"], **_numeric(result["metrics"])})
        for path in result.get("artifacts", []):
            tracker.log_artifact(run_id, path)
        tracker.end(run_id, "FINISHED")
        result["mlflow_run_id"] = run_id
    outputs = [v for v in _flat_strings(result.get("outputs", {}))]
    write_success(spec, result, outputs)
    artifacts.stage_summary(ctx.run_name, spec.stage, {k: v for k, v in result.items() if k != "artifacts"})
    log.info("%s: done in %.1f s", spec.stage, result["seconds"])
    return result


def _run_through_launcher(
    spec: StageSpec,
    ctx: RunContext,
    job: StageJob,
    tracker: Tracker | None,
    run_id: str | None,
    progress_total: int | None,
    metrics_file: str | None,
) -> dict[str, Any]:
    log = _logger()
    launcher_cfg = LauncherConfig(**{k: v for k, v in spec.launcher.items() if k != "resources"})
    resources = Resources(**spec.launcher.get("resources", {}))
    launcher = make_launcher(launcher_cfg)
    handle = launcher.attach(spec.stage_dir)
    if handle is not None:
        log.info("%s: re-attached to %s job %s (%s)", spec.stage, handle.kind, handle.job_id, handle.state())
    else:
        handle = launcher.submit(job, spec.stage_dir, f"{ctx.run_name}-{spec.stage}", resources)
        log.info("%s: submitted %s job %s", spec.stage, handle.kind, handle.job_id)
    if tracker and run_id:
        tracker.set_tags(run_id, {f"{handle.kind}_job_id": handle.job_id})
    artifacts.job_links(ctx.run_name, spec.stage, handle.job_id, handle.kind, handle.log_paths())
    forwarder = MetricsForwarder(tracker, run_id, metrics_file) if metrics_file else None
    progress = artifacts.Progress(ctx.run_name, spec.stage, progress_total)

    def on_tick() -> None:
        if forwarder and forwarder.poll():
            progress.update(forwarder.last.get("iteration"))

    try:
        result = wait(handle, launcher_cfg.poll_interval_s, on_tick)
    except BaseException:
        if not handle.done():
            log.warning("%s: stopping %s job %s", spec.stage, handle.kind, handle.job_id)
            handle.cancel()
        raise
    if forwarder:
        result.setdefault("metrics", {})
        result["metrics"].setdefault("train_rows", forwarder.rows)
    return result


def cancel_active_jobs(work_dir: str) -> list[str]:
    """Cancel every job recorded as running under ``work_dir`` (flow cancellation / crash hooks)."""
    from tasks.launch import SlurmLauncher, stop_orphan

    cancelled = []
    for stage in sorted(os.listdir(work_dir)) if os.path.isdir(work_dir) else []:
        stage_dir = os.path.join(work_dir, stage)
        state = read_state(stage_dir)
        record = state.get("job") or {}
        if state.get("status") != "running" or not record:
            continue
        if record.get("kind") == "slurm":
            handle = SlurmLauncher(LauncherConfig(kind="slurm")).attach(stage_dir)
            if handle is not None and not handle.done():
                handle.cancel()
                cancelled.append(f"{stage}:{record['job_id']}")
        elif record.get("kind") == "local":
            stop_orphan(int(record["job_id"]))
            cancelled.append(f"{stage}:{record['job_id']}")
        write_state(stage_dir, status="cancelled")
    return cancelled


def launcher_section(launcher: LauncherConfig, stage: str) -> dict[str, Any]:
    """The launcher settings a stage spec carries (part of its cache key: resources change the job)."""
    data = {f.name: getattr(launcher, f.name) for f in dataclasses.fields(LauncherConfig) if f.name != "stages"}
    data["resources"] = resources_dict(launcher.resources_for(stage))
    return data


def _numeric(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, dict)) and not isinstance(v, bool)}


def _flat_strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _flat_strings(v)]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _flat_strings(v)]
    return []

