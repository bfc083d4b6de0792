"""Flow state hooks: a cancelled or crashed pipeline cancels the Slurm/local jobs it started."""

from __future__ import annotations

from typing import Any


def _work_dir(parameters: dict[str, Any]) -> str | None:
    from tasks.wiring import resolve_config

    try:
        return resolve_config(parameters.get("config"), parameters.get("config_path"), parameters.get("overrides")).work_dir
    except Exception:  # an invalid config never started a job
        return None


def cancel_jobs(flow, flow_run, state) -> None:
    """``on_cancellation`` / ``on_crashed``: cancel every job recorded as running in the run directory,
    unless another live run holds the directory (its jobs are not ours to stop)."""
    from prefect.logging import get_logger

    from tasks.runner import cancel_active_jobs
    from tasks.workdir_lock import WorkDirLock

    work_dir = _work_dir(dict(flow_run.parameters or {}))
    if not work_dir:
        return
    if WorkDirLock(work_dir).held_by_another_live_process():
        get_logger("flows").warning("flow run %s is %s: %s is held by another run; its jobs are left alone",
                                    flow_run.id, state.type.value, work_dir)
        return
    cancelled = cancel_active_jobs(work_dir)
    if cancelled:
        get_logger("flows").warning("flow run %s is %s: cancelled jobs %s", flow_run.id, state.type.value, cancelled)
