"""Run one stage: reuse its result if its identity finished, else re-attach to or submit its job, follow
it, record it. This is the flow side (it talks to MLflow and Prefect); the job side is ``tasks.launch``.

The order of events for a stage, whatever the launcher:

1. The completion record of the stage's identity exists and its outputs are intact → the result is
   *reused*: an MLflow child run tagged ``outcome=reused`` points at the run that computed it.
2. Otherwise the stage is *recomputed*, and the reason says which part of the identity changed since the
   last result (``tasks.record.explain_change``). Jobs still active for outdated identities of the stage
   are cancelled; a job still active for *this* identity is re-attached, else a new one is submitted
   (heavy stages) or the job runs in this process (light stages). New ``metrics.jsonl`` rows are forwarded
   to MLflow and a Prefect progress artifact while it runs.
3. The completion record is written (last, atomically); metrics and artifacts go to the child run; the
   job log tail and the stage summary become Prefect artifacts.

If the flow is cancelled or interrupted while a job runs, the job is cancelled; if the flow process is
killed outright the job keeps running and the next run re-attaches to it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Any

from tasks import artifacts
from tasks.config import LauncherConfig, Resources
from tasks.launch import StageJob, StageJobFailed, cancel_outdated_jobs, make_launcher, wait
from tasks.pipeline_run import RunContext
from tasks.record import (
    StageResult,
    StageSpec,
    current_record,
    explain_change,
    finished,
    write_record,
    write_state,
)
from tasks.tracking import MetricsForwarder, Tracker

PROGRESS = logging.getLogger("dinov2.progress")  # one console line per stage (the CLI shows only these)


def logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a flow or task run, else this module's logger."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("tasks")


def _flow_run_id() -> str | None:
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    return str(ctx.flow_run.id) if ctx and ctx.flow_run else None


def _start_child(tracker: Tracker | None, spec: StageSpec, ctx: RunContext, outcome: str, reason: str,
                 extra_tags: dict[str, Any] | None = None) -> str | None:
    if tracker is None:
        return None
    return tracker.start_run(
        spec.stage,
        # the report's inputs are every upstream result: already in their own runs
        params={"config": spec.config, "launcher": spec.launcher,
                **({"inputs": spec.inputs} if spec.definition.kind != "report" else {})},
        tags={
            "stage": spec.stage,
            "outcome": outcome,
            "reason": reason,
            "identity": spec.identity,
            "stage_dir": spec.stage_dir,
            "code_version": ctx.code_version,
            "config_hash": ctx.config_hash,
            "prefect_flow_run_id": _flow_run_id(),
            "work_dir": ctx.work_dir,
            **(extra_tags or {}),
        },
        parent_id=ctx.parent_run_id,
    )


def run_stage(spec: StageSpec, ctx: RunContext) -> StageResult:
    """Reuse or compute ``spec``'s result (see the module docstring)."""
    log = logger()
    definition = spec.definition
    tracker = ctx.tracker()
    if not definition.always_run:
        done, why_not = finished(spec)
        if done is not None:
            return _reuse(spec, ctx, tracker, done)
    else:
        why_not = ""
    previous = current_record(spec.stage_root)
    if definition.always_run:
        reason = "runs every time"
    elif previous is not None and previous.get("identity") == spec.identity:
        reason = why_not
    else:
        reason = explain_change(spec, previous)
    log.info("%s: computing (%s)", spec.stage, reason)
    PROGRESS.info("%-8s computing: %s", spec.stage, reason)
    ctx.record(spec.stage, outcome="running", reason=reason, identity=spec.identity)

    os.makedirs(spec.stage_dir, exist_ok=True)
    started = time.time()
    write_state(spec.stage_dir, status="running", started_at=time.strftime("%Y-%m-%dT%H:%M:%S"), error=None,
                root_cause=None, prefect_flow_run_id=_flow_run_id())
    run_id = None
    try:
        run_id = _start_child(tracker, spec, ctx, "recomputed", reason)
        write_state(spec.stage_dir, mlflow_run_id=run_id)
        job = StageJob(definition.job, spec.job_kwargs(), distributed=definition.distributed)
        with (tracker.system_metrics(run_id, ctx.system_metrics) if tracker and run_id else contextlib.nullcontext()):
            if definition.heavy:
                raw = _run_through_launcher(spec, ctx, job, tracker, run_id)
            else:
                raw = job()
    except BaseException as exc:
        cause = exc.root_cause if isinstance(exc, StageJobFailed) else f"{type(exc).__name__}: {str(exc)[:500]}"
        write_state(spec.stage_dir, status="failed", root_cause=cause, error=f"{type(exc).__name__}: {str(exc)[:4000]}")
        ctx.record(spec.stage, outcome="failed", reason=reason, error=cause, identity=spec.identity)
        PROGRESS.warning("%-8s FAILED: %s", spec.stage, cause)
        if tracker and run_id:
            tracker.set_tags(run_id, {"error": cause})
            tracker.end(run_id, "KILLED" if not isinstance(exc, Exception) else "FAILED")
        raise

    raw = dict(raw)
    result = StageResult(
        stage=spec.stage, identity=spec.identity, outputs=dict(raw.pop("outputs", {})),
        metrics=dict(raw.pop("metrics", {})), artifacts=list(raw.pop("artifacts", [])),
        seconds=round(time.time() - started, 2), outcome="recomputed", reason=reason, mlflow_run_id=run_id, extra=raw,
    )
    if tracker and run_id:
        tracker.log_metrics(run_id, {"stage_seconds": result.seconds, **_numeric(result.metrics)})
        for path in result.artifacts:
            tracker.log_artifact(run_id, path, _artifact_folder(path, result.outputs.get("dir")))
        tracker.end(run_id, "FINISHED")
    if result.extra.get("complete") is False:
        PROGRESS.warning("%-8s finished with transient read losses (%s): its result will not be reused",
                         spec.stage, {k: v for k, v in result.metrics.items() if "transient" in k})
    if not definition.always_run:
        write_record(spec, result)
    else:
        write_state(spec.stage_dir, status="done")
    ctx.record(spec.stage, outcome="recomputed", reason=reason, identity=spec.identity, seconds=result.seconds)
    artifacts.stage_summary(ctx.run_name, spec.stage, _summary(result))
    log.info("%s: done in %.1f s", spec.stage, result.seconds)
    PROGRESS.info("%-8s done in %.1f s", spec.stage, result.seconds)
    return result


def _reuse(spec: StageSpec, ctx: RunContext, tracker: Tracker | None, done: StageResult) -> StageResult:
    """Hand back a finished result; the run's MLflow parent still gets a child with its metrics."""
    computed_in = done.mlflow_run_id
    reason = f"same inputs as the result finished in {os.path.basename(spec.stage_dir)}"
    logger().info("%s: reused (%s)", spec.stage, reason)
    PROGRESS.info("%-8s reused: %s", spec.stage, reason)
    run_id = _start_child(tracker, spec, ctx, "reused", reason, {"computed_in_run": computed_in})
    if tracker and run_id:
        tracker.log_metrics(run_id, _numeric(done.metrics))
        tracker.end(run_id, "FINISHED")
    reused = StageResult.from_dict({**done.to_dict(), "outcome": "reused", "reason": reason, "seconds": 0.0,
                                    "mlflow_run_id": run_id or computed_in})
    ctx.record(spec.stage, outcome="reused", reason=reason, identity=spec.identity)
    artifacts.stage_summary(ctx.run_name, spec.stage, _summary(reused))
    return reused


def _summary(result: StageResult) -> dict[str, Any]:
    return {"outcome": result.outcome, "reason": result.reason, "identity": result.identity[:16],
            "seconds": result.seconds, "outputs": result.outputs, "metrics": result.metrics}


def _run_through_launcher(spec: StageSpec, ctx: RunContext, job: StageJob, tracker: Tracker | None,
                          run_id: str | None) -> dict[str, Any]:
    log = logger()
    launcher_cfg = LauncherConfig(**{k: v for k, v in spec.launcher.items() if k != "resources"})
    resources = Resources(**spec.launcher.get("resources", {}))
    cancel_outdated_jobs(spec.stage_root, spec.stage_dir)
    launcher = make_launcher(launcher_cfg)
    handle = launcher.attach(spec.stage_dir)
    if handle is not None:
        log.info("%s: re-attached to %s job %s (%s)", spec.stage, handle.kind, handle.job_id, handle.state())
    else:
        handle = launcher.submit(job, spec.stage_dir, f"{ctx.run_name}-{spec.stage}", resources)
        log.info("%s: submitted %s job %s", spec.stage, handle.kind, handle.job_id)
    if tracker and run_id:
        tracker.set_tags(run_id, {f"{handle.kind}_job_id": handle.job_id})
    metrics_file = os.path.join(spec.stage_dir, "metrics.jsonl") if spec.definition.kind == "train" else None
    forwarder = MetricsForwarder(tracker, run_id, metrics_file) if metrics_file else None
    progress = artifacts.Progress(ctx.run_name, spec.stage, _iterations(spec))

    def on_tick() -> None:
        if forwarder and forwarder.poll():
            progress.update(forwarder.last.get("iteration"))

    try:
        result = wait(handle, launcher_cfg.poll_interval_s, on_tick)
    except BaseException:
        if not handle.done():
            log.warning("%s: stopping %s job %s", spec.stage, handle.kind, handle.job_id)
            handle.cancel()
        artifacts.job_log(ctx.run_name, spec.stage, handle)
        raise
    artifacts.job_log(ctx.run_name, spec.stage, handle)
    if forwarder:
        result.setdefault("metrics", {})
        result["metrics"].setdefault("train_rows", forwarder.rows)
    return result


def _iterations(spec: StageSpec) -> int | None:
    if spec.definition.kind != "train":
        return None
    from dinov2_core.train.config import TrainConfig
    from dinov2_core.utils.config import from_dict

    return from_dict(TrainConfig, spec.config).max_iter + 1


def cancel_active_jobs(work_dir: str) -> list[str]:
    """Cancel every job recorded as running under ``work_dir`` (flow cancellation / crash hooks)."""
    from tasks.launch import stop_recorded_job
    from tasks.record import identity_dirs
    from tasks.stage_table import STAGES

    cancelled = []
    for stage in STAGES:
        for stage_dir in identity_dirs(os.path.join(work_dir, stage)):
            job_id = stop_recorded_job(stage_dir)
            if job_id:
                cancelled.append(f"{stage}:{job_id}")
    return cancelled


def _artifact_folder(path: str, output_dir: str | None) -> str | None:
    """Artifacts keep their folder below the stage's output (``distill/pca.png``, ``pretrain/pca.png``), so
    files of the same name from different backbones do not overwrite each other in the run."""
    if not output_dir or "://" in output_dir:
        return None
    folder = os.path.relpath(os.path.dirname(os.path.abspath(path)), os.path.abspath(output_dir))
    return None if folder == "." or folder.startswith("..") else folder


def _numeric(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, dict)) and not isinstance(v, bool)}
