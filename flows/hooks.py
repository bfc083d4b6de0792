"""Flow state hooks: a cancelled or crashed pipeline cancels the Slurm/local jobs it started."""

from __future__ import annotations

from typing import Any


def _work_dir(parameters: dict[str, Any]) -> str | None:
    from tasks.pipeline_run import resolve_config

    try:
        return resolve_config(parameters.get("config"), parameters.get("config_path"), parameters.get("overrides")).work_dir
    except Exception:  # an invalid config never started a job
        return None


def cancel_jobs(flow, flow_run, state) -> None:
    """``on_cancellation`` / ``on_crashed``: cancel every job recorded as running in the run directory."""
    from prefect.logging import get_logger

    from tasks.runner import cancel_active_jobs

    work_dir = _work_dir(dict(flow_run.parameters or {}))
    if work_dir:
        cancelled = cancel_active_jobs(work_dir)
        if cancelled:
            get_logger("flows").warning("flow run %s is %s: cancelled jobs %s", flow_run.id, state.type.value, cancelled)
