"""Smoke tests of the local Slurm cluster through submitit: results, ranks, fake GPUs, accounting, preemption."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
import submitit

JOB_TIMEOUT_S = 60
# submitit's result() has no timeout: a broken cluster must fail the test, not hang the suite.
pytestmark = pytest.mark.timeout(120)


def _add(a: int, b: int) -> int:
    return a + b


def _task_identity() -> tuple[int, int, int]:
    env = submitit.JobEnvironment()
    return env.global_rank, env.local_rank, env.num_tasks


def _visible_gpus() -> str | None:
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def _sleep(seconds: float) -> None:
    time.sleep(seconds)


def _announce_then_sleep(marker: Path, seconds: float) -> None:
    marker.touch()
    time.sleep(seconds)


def _executor(folder, cluster, **parameters) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    executor.update_parameters(**{"timeout_min": 5, "slurm_partition": cluster.partition, "cpus_per_task": 1,
                                  **parameters})
    return executor


def _state(job: submitit.Job) -> str:
    """The job's state from a fresh sacct call (``job.state`` may be cached for up to a minute)."""
    return job.get_info(mode="force").get("State", "UNKNOWN")


def _sacct_states(job_id: str) -> list[str]:
    """Every state accounting recorded for the job's allocations (``-D``: requeued instances too)."""
    out = subprocess.run(
        ["sacct", "-j", job_id, "-X", "-D", "-n", "-P", "-o", "State"],
        capture_output=True, text=True, check=True, timeout=20,
    ).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.5)


def test_submitit_job_returns_its_result(slurm_cluster, tmp_path):
    job = _executor(tmp_path, slurm_cluster).submit(_add, 2, 3)
    assert job.result() == 5
    # The result file appears before slurmctld has reported the job's end to slurmdbd.
    _wait_for(lambda: _sacct_states(job.job_id) == ["COMPLETED"], JOB_TIMEOUT_S, "sacct to say COMPLETED")


def test_two_tasks_per_node_get_distinct_ranks(slurm_cluster, tmp_path):
    job = _executor(tmp_path, slurm_cluster, tasks_per_node=2).submit(_task_identity)
    identities = sorted(job.results())
    assert identities == [(0, 0, 2), (1, 1, 2)]


def test_gpu_request_sets_cuda_visible_devices(slurm_cluster, tmp_path):
    assert slurm_cluster.gpus >= 1
    job = _executor(tmp_path, slurm_cluster, gpus_per_node=1).submit(_visible_gpus)
    assert job.result() == "0"


def test_cancelled_job_is_recorded_as_cancelled(slurm_cluster, tmp_path):
    job = _executor(tmp_path, slurm_cluster).submit(_sleep, 300)
    _wait_for(lambda: _state(job) == "RUNNING", JOB_TIMEOUT_S, "the job to run")
    job.cancel(check=True)
    _wait_for(lambda: _sacct_states(job.job_id)[:1] == ["CANCELLED"], JOB_TIMEOUT_S, "sacct to say CANCELLED")
    assert _state(job).startswith("CANCELLED")
    assert job.done(force_check=True)


def test_high_priority_partition_preempts_and_requeues_low(slurm_cluster, tmp_path):
    """A job filling the node in ``low`` is signalled and requeued when a ``high`` job needs a CPU."""
    # submitit calls any signal a time-out unless the job ran < 80% of, and > 10 min less than, its
    # limit; a short limit would make it give up instead of requeueing.
    victim = _executor(tmp_path / "low", slurm_cluster, timeout_min=60, slurm_partition=slurm_cluster.low_partition,
                       cpus_per_task=slurm_cluster.cpus).submit(_announce_then_sleep, tmp_path / "started", 300)
    try:
        # Only once the function runs has submitit installed its signal handlers; a signal before that
        # kills the job instead of requeueing it.
        _wait_for((tmp_path / "started").exists, JOB_TIMEOUT_S, "the low-priority job to run")
        urgent = _executor(tmp_path / "high", slurm_cluster,
                           slurm_partition=slurm_cluster.high_partition).submit(_add, 1, 1)
        assert urgent.result() == 2
        _wait_for(lambda: {"PREEMPTED", "REQUEUED"} & set(_sacct_states(victim.job_id)), JOB_TIMEOUT_S,
                  "accounting to record the preemption")
        assert "this job is preempted" in victim.stderr()
        assert not victim.done(force_check=True), "a preempted job must be requeued, not finished"
    finally:
        victim.cancel(check=False)
