"""The Prefect task every stage runs as: named after the stage, retried on transient failures only.

There is no Prefect result cache: whether a stage is done is decided by its completion record
(``tasks.record``), which knows the content of every input and checks that the outputs still exist. A
cache keyed on task inputs would answer the same question with another rule (and hand back results whose
files were deleted).
"""

from __future__ import annotations

from typing import Any

from prefect import Task, task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from dinov2_core.utils.config import ConfigError
from dinov2_core.utils.errors import is_transient_error
from tasks.launch import StageJobFailed, TransientStageError
from tasks.record import StageResult, StageSpec
from tasks.runner import RunContext, run_stage

RETRIES = 2


def is_transient(exc: BaseException) -> bool:
    """Retry infrastructure failures (S3/network, sbatch); never a bad config, a failed job's own error
    or a full disk."""
    if isinstance(exc, (ConfigError, StageJobFailed)):
        return False
    if isinstance(exc, TransientStageError):
        return True
    return is_transient_error(exc)


def retry_condition(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry only transient failures."""
    try:
        state.result()
    except BaseException as exc:  # the state's exception is re-raised by result()
        return is_transient(exc)
    return False


def _run(spec: StageSpec, run_context: RunContext) -> StageResult:
    return run_stage(spec, run_context)


def stage_task(stage: str) -> Task[Any, StageResult]:
    """The Prefect task of ``stage``."""
    return task(
        _run,
        name=stage,
        task_run_name=stage,
        cache_policy=NO_CACHE,
        persist_result=False,
        retries=RETRIES,
        retry_delay_seconds=exponential_backoff(backoff_factor=5),
        retry_jitter_factor=0.5,
        retry_condition_fn=retry_condition,
    )
