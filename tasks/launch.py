"""Dispatch of heavy stages: the same picklable job callable runs locally or as a Slurm job.

``StageJob`` names a stage entry point (``"tasks.pretrain:execute"``) and its keyword arguments. The
:class:`LocalLauncher` runs it in a subprocess through submitit's ``LocalExecutor`` (or inline, in
this process); the :class:`SlurmLauncher` submits it with ``submitit.AutoExecutor`` with every resource
taken from the config. Inside a Slurm job, distributed stages export the ``torch.distributed``
environment from submitit before the entry point runs, so the trainer's ``init_process_group``
(env://) picks it up.

Time limits and preemption: ``StageJob.checkpoint`` hands submitit a *fresh* copy of the same job,
which submitit requeues (up to ``max_num_timeout`` times for time limits). The entry points are
idempotent and resume from their own newest complete checkpoint, so the copy carries no "resume
from" state (pickled arguments are replayed verbatim on requeue).

A job's id and log folder are recorded in the stage's ``_state.json`` so that a resumed flow
re-attaches to a job that is still running instead of submitting a duplicate.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable, Protocol

from tasks.config import LauncherConfig, Resources
from tasks.stage import TransientStageError, read_state, write_state

LOG_TAIL_LINES = 40
ACTIVE_SLURM_STATES = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED", "UNKNOWN"}


class StageJobFailed(RuntimeError):
    """A stage job ended without a result; the message carries the tail of its log."""


class StageJob:
    """A picklable call of ``module:function(**kwargs)``; submitit requeues it on time limit/preemption."""

    def __init__(self, target: str, kwargs: dict[str, Any], distributed: bool = False) -> None:
        self.target = target
        self.kwargs = kwargs
        self.distributed = distributed

    def __call__(self) -> Any:
        if self.distributed and "SLURM_JOB_ID" in os.environ:
            import submitit.helpers

            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        module_name, function_name = self.target.split(":")
        function = getattr(importlib.import_module(module_name), function_name)
        return function(**self.kwargs)

    def checkpoint(self, *args: Any, **kwargs: Any):
        """Called by submitit before a time-limit/preemption requeue: resubmit a fresh copy."""
        import submitit.helpers

        return submitit.helpers.DelayedSubmission(StageJob(self.target, self.kwargs, self.distributed))

    def __repr__(self) -> str:
        return f"StageJob({self.target})"


class JobHandle(Protocol):
    job_id: str
    kind: str

    def done(self) -> bool: ...
    def state(self) -> str: ...
    def result(self) -> Any: ...
    def cancel(self) -> None: ...
    def log_paths(self) -> list[str]: ...


class InlineHandle:
    """A job that ran to completion in this process."""

    kind = "inline"

    def __init__(self, job: StageJob) -> None:
        self.job_id = f"inline-{os.getpid()}"
        self._result = job()

    def done(self) -> bool:
        return True

    def state(self) -> str:
        return "COMPLETED"

    def result(self) -> Any:
        return self._result

    def cancel(self) -> None:
        return None

    def log_paths(self) -> list[str]:
        return []


class SubmititHandle:
    """A submitit job (local subprocess or Slurm)."""

    def __init__(self, job, kind: str) -> None:
        self.job = job
        self.kind = kind
        self.job_id = str(job.job_id)

    def done(self) -> bool:
        if self.kind == "slurm":
            return self.job.done(force_check=True)
        return self.job.done()

    def state(self) -> str:
        return str(self.job.state)

    def log_paths(self) -> list[str]:
        paths = self.job.paths
        return [str(paths.stdout), str(paths.stderr)]

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        chunks = []
        for path in self.log_paths():
            try:
                text = Path(path).read_text(errors="replace")
            except OSError:
                continue
            tail = "\n".join(text.splitlines()[-lines:])
            if tail:
                chunks.append(f"--- {path} (last {lines} lines) ---\n{tail}")
        return "\n".join(chunks) or "(no log output)"

    def result(self) -> Any:
        try:
            return self.job.result()
        except Exception as exc:
            raise StageJobFailed(
                f"{self.kind} job {self.job_id} failed (state {self.state()}): {type(exc).__name__}: "
                f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}\n{self.log_tail()}"
            ) from exc

    def cancel(self) -> None:
        try:
            self.job.cancel(check=False)
        except Exception:  # cancelling an already finished job is not an error worth surfacing
            pass


class Launcher(Protocol):
    kind: str

    def submit(self, job: StageJob, stage_dir: str, name: str, resources: Resources) -> JobHandle: ...
    def attach(self, stage_dir: str) -> JobHandle | None: ...


def _executor_folder(stage_dir: str) -> str:
    return os.path.join(stage_dir, "jobs")


class LocalLauncher:
    """This machine: a submitit ``LocalExecutor`` subprocess (``subprocess``) or this process (``inline``)."""

    kind = "local"

    def __init__(self, mode: str = "subprocess") -> None:
        self.mode = mode

    def submit(self, job: StageJob, stage_dir: str, name: str, resources: Resources) -> JobHandle:
        if self.mode == "inline":
            write_state(stage_dir, job={"kind": "inline", "job_id": f"inline-{os.getpid()}"})
            return InlineHandle(job)
        import submitit

        executor = submitit.AutoExecutor(folder=_executor_folder(stage_dir), cluster="local")
        executor.update_parameters(
            name=name,
            timeout_min=resources.timeout_min or 60,
            tasks_per_node=resources.tasks_per_node or 1,
            gpus_per_node=resources.gpus_per_node or 0,
        )
        handle = SubmititHandle(executor.submit(job), "local")
        write_state(stage_dir, job={"kind": "local", "job_id": handle.job_id, "folder": _executor_folder(stage_dir)})
        return handle

    def attach(self, stage_dir: str) -> JobHandle | None:
        """A local job cannot be re-attached once its parent is gone; stop a leftover one (the resumed
        stage restarts from its checkpoint) so that two processes never write the same outputs."""
        record = read_state(stage_dir).get("job") or {}
        if record.get("kind") == "local":
            stop_orphan(int(record["job_id"]))
        return None


def stop_orphan(pid: int, grace_s: float = 10.0) -> None:
    """Terminate a leftover submitit subprocess of ours (checked by its command line, not its name)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return
    if b"submitit" not in cmdline:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + grace_s
        while time.time() < deadline:
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                return
            if stat.split(")")[-1].split()[0] == "Z":
                return
            time.sleep(0.2)


class SlurmLauncher:
    """Slurm through ``submitit.AutoExecutor``; every resource comes from the config."""

    kind = "slurm"

    def __init__(self, config: LauncherConfig) -> None:
        self.config = config

    def parameters(self, name: str, resources: Resources) -> dict[str, Any]:
        params: dict[str, Any] = {
            "name": name,
            "timeout_min": resources.timeout_min,
            "nodes": resources.nodes,
            "tasks_per_node": resources.tasks_per_node,
            "cpus_per_task": resources.cpus_per_task,
            "slurm_signal_delay_s": resources.signal_delay_s,
        }
        if resources.gpus_per_node:
            params["gpus_per_node"] = resources.gpus_per_node
        if resources.mem_gb is not None:
            params["mem_gb"] = resources.mem_gb
        for key in ("partition", "account", "qos", "constraint"):
            value = getattr(resources, key)
            if value:
                params[f"slurm_{key}"] = value
        if self.config.setup:
            params["slurm_setup"] = list(self.config.setup)
        if resources.additional:
            params["slurm_additional_parameters"] = dict(resources.additional)
        return params

    def submit(self, job: StageJob, stage_dir: str, name: str, resources: Resources) -> JobHandle:
        import submitit

        folder = _executor_folder(stage_dir)
        executor = submitit.AutoExecutor(
            folder=folder, cluster="slurm", slurm_max_num_timeout=resources.max_num_timeout or 0
        )
        executor.update_parameters(**self.parameters(name, resources))
        try:
            submitted = executor.submit(job)
        except Exception as exc:  # sbatch errors (controller busy, socket timeout) are worth a retry
            if type(exc).__name__ == "FailedSubmissionError":
                raise TransientStageError(f"sbatch failed for {name}: {exc}") from exc
            raise
        handle = SubmititHandle(submitted, "slurm")
        write_state(stage_dir, job={"kind": "slurm", "job_id": handle.job_id, "folder": folder})
        return handle

    def attach(self, stage_dir: str) -> JobHandle | None:
        """Re-attach to this stage's Slurm job if it is still queued/running or finished successfully."""
        record = read_state(stage_dir).get("job") or {}
        if record.get("kind") != "slurm":
            return None
        import submitit

        handle = SubmititHandle(submitit.SlurmJob(record["folder"], record["job_id"]), "slurm")
        state = handle.state()
        if state in ACTIVE_SLURM_STATES or (state == "COMPLETED" and handle.job.paths.result_pickle.exists()):
            return handle
        return None


def make_launcher(config: LauncherConfig) -> Launcher:
    if config.kind == "slurm":
        return SlurmLauncher(config)
    return LocalLauncher(config.local_mode)


def wait(handle: JobHandle, poll_interval_s: float, on_tick: Callable[[], None] | None = None) -> Any:
    """Poll until the job ends (calling ``on_tick`` between sleeps), then return its result."""
    while not handle.done():
        if on_tick:
            on_tick()
        time.sleep(poll_interval_s)
    if on_tick:
        on_tick()
    return handle.result()


def resources_dict(resources: Resources) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(resources).items() if v is not None}
