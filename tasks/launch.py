"""Dispatch of heavy stages: the same picklable job callable runs locally or as a Slurm job.

``StageJob`` names a stage entry point (``"tasks.training:execute"``) and its keyword arguments. The
:class:`LocalLauncher` runs it in a subprocess through submitit's ``LocalExecutor`` (or inline, in
this process); the :class:`SlurmLauncher` submits it with ``submitit.AutoExecutor`` with every resource
taken from the config. In a job with several tasks every task runs the entry point with ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` exported (distributed stages also get ``MASTER_ADDR``/``MASTER_PORT``
from submitit), and the job's result is rank 0's: data stages split their work by rank, and the trainer
joins one process group.

Time limits and preemption: Slurm sends ``USR2`` ``signal_delay_s`` seconds before the limit. The
trainer saves a checkpoint at the iteration in flight, then submitit's handler calls
``StageJob.checkpoint``, which hands submitit a *fresh* copy of the same job to requeue (up to
``max_num_timeout`` times for time limits). Entry points are idempotent and resume from their own
newest complete checkpoint, so the copy carries no "resume from" state.

A job's id, task count and log folder are recorded in ``_state.json`` of the stage's identity directory,
so a resumed flow re-attaches only to a job submitted for the same identity; jobs of outdated identities
are cancelled (:func:`cancel_outdated_jobs`). This module imports no Prefect: compute nodes unpickle it.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Protocol

from tasks.config import LauncherConfig, Resources
from tasks.record import identity_dirs, read_state, write_state

LOG_TAIL_LINES = 40
ACTIVE_SLURM_STATES = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED", "UNKNOWN"}
ERROR_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Za-z_]\w*(?:Error|Exception|Interrupt|Exit)\b.*$")
log = logging.getLogger(__name__)


class StageJobFailed(RuntimeError):
    """A stage job ended without a result; the message carries the failing task's log tail and
    ``root_cause`` the last error line of its traceback (what ``status`` shows)."""

    def __init__(self, message: str, root_cause: str) -> None:
        super().__init__(message)
        self.root_cause = root_cause


class TransientStageError(RuntimeError):
    """A failure worth retrying (infrastructure, not the stage's own logic)."""


def root_cause(text: str) -> str:
    """The last ``SomeError: message`` line of a traceback (the real error, not a wrapper's)."""
    lines = [line.strip() for line in text.splitlines() if ERROR_LINE.match(line.strip())]
    wrappers = ("FailedJobError", "UncompletedJobError", "StageJobFailed")
    real = [line for line in lines if not line.startswith(wrappers) and "submitit" not in line.split(":")[0]]
    return (real or lines or [text.strip().splitlines()[-1] if text.strip() else "unknown error"])[-1][:500]


def export_task_environment(distributed: bool) -> None:
    """Inside a submitit job: export the rank variables every task needs (and the rendezvous for
    ``torch.distributed`` when ``distributed``)."""
    import submitit

    try:
        env = submitit.JobEnvironment()
    except RuntimeError:  # not a submitit job (inline)
        return
    if distributed:
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    os.environ.update(RANK=str(env.global_rank), WORLD_SIZE=str(env.num_tasks), LOCAL_RANK=str(env.local_rank))


class StageJob:
    """A picklable call of ``module:function(**kwargs)``; submitit requeues it on time limit/preemption."""

    def __init__(self, target: str, kwargs: dict[str, Any], distributed: bool = False) -> None:
        self.target = target
        self.kwargs = kwargs
        self.distributed = distributed

    def __call__(self) -> Any:
        if "SUBMITIT_EXECUTOR" in os.environ or "SLURM_JOB_ID" in os.environ:
            export_task_environment(self.distributed)
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
    """A submitit job (local subprocess or Slurm) of one or more tasks."""

    def __init__(self, job, kind: str) -> None:
        self.job = job
        self.kind = kind
        self.job_id = str(job.job_id)

    @property
    def num_tasks(self) -> int:
        return max(1, len(self.job._sub_jobs))

    def _tasks(self) -> list:
        return list(self.job._sub_jobs) or [self.job]

    def done(self) -> bool:
        if self.kind == "slurm":
            return self.job.done(force_check=True)
        return self.job.done()

    def state(self) -> str:
        return str(self.job.state)

    def log_paths(self) -> list[str]:
        return [str(path) for task in self._tasks() for path in (task.paths.stdout, task.paths.stderr)]

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The tail of each task's log, the tasks whose log holds a traceback first."""
        chunks = []
        for path in self.log_paths():
            try:
                text = Path(path).read_text(errors="replace")
            except OSError:
                continue
            tail = "\n".join(text.splitlines()[-lines:])
            if tail:
                chunks.append((0 if "Traceback" in text else 1, f"--- {path} (last {lines} lines) ---\n{tail}"))
        return "\n".join(chunk for _, chunk in sorted(chunks, key=lambda c: c[0])) or "(no log output)"

    def result(self) -> Any:
        """Rank 0's result (every task ran the same entry point; data stages return theirs on rank 0)."""
        try:
            return self.job.results()[0]
        except Exception as exc:
            tail = self.log_tail()
            cause = root_cause(str(exc)) if str(exc).strip() else root_cause(tail)
            raise StageJobFailed(
                f"{self.kind} job {self.job_id} failed (state {self.state()}, {self.num_tasks} task(s)): {cause}\n{tail}",
                cause,
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


def _record_job(stage_dir: str, kind: str, handle: SubmititHandle, folder: str) -> None:
    write_state(stage_dir, job={"kind": kind, "job_id": handle.job_id, "folder": folder,
                                "num_tasks": handle.num_tasks, "pid": os.getpid()})


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
        _record_job(stage_dir, "local", handle, _executor_folder(stage_dir))
        return handle

    def attach(self, stage_dir: str) -> JobHandle | None:
        """A local job cannot be re-attached once its parent is gone; stop a leftover one (the resumed
        stage restarts from its checkpoint) so that two processes never write the same outputs. The
        work-dir lock guarantees that the parent run is dead."""
        record = read_state(stage_dir).get("job") or {}
        if record.get("kind") == "local":
            stop_orphan(int(record["job_id"]))
        return None


def stop_orphan(pid: int, grace_s: float = 10.0) -> bool:
    """Terminate a leftover submitit subprocess of ours (checked by its command line, not its name).
    Returns whether there was one."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return False
    if b"submitit" not in cmdline:
        return False
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return True
        deadline = time.time() + grace_s
        while time.time() < deadline:
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                return True
            if stat.split(")")[-1].split()[0] == "Z":
                return True
            time.sleep(0.2)
    return True


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
        _record_job(stage_dir, "slurm", handle, folder)
        return handle

    def attach(self, stage_dir: str) -> JobHandle | None:
        """This identity's Slurm job if it is still queued/running or finished with a result, with the
        task count it was submitted with."""
        handle = slurm_handle(read_state(stage_dir).get("job") or {})
        if handle is None:
            return None
        state = handle.state()
        if state in ACTIVE_SLURM_STATES or (state == "COMPLETED" and handle.job.paths.result_pickle.exists()):
            return handle
        return None


def slurm_handle(record: dict[str, Any]) -> SubmititHandle | None:
    """A handle on the Slurm job a ``_state.json`` job record names (``None`` for other kinds)."""
    if record.get("kind") != "slurm":
        return None
    import submitit

    tasks = range(int(record.get("num_tasks") or 1))
    return SubmititHandle(submitit.SlurmJob(record["folder"], record["job_id"], tasks=tuple(tasks)), "slurm")


_SLURM_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def parse_slurm_time_min(text: str) -> int | None:
    """Minutes of a Slurm time limit (``30``, ``2:00:00``, ``1-12``, ``1-00:00:00``); ``None`` if unlimited."""
    text = text.strip()
    if text.upper() in ("UNLIMITED", "INFINITE", ""):
        return None
    match = _SLURM_TIME.match(text)
    if match is None:
        raise ValueError(f"not a Slurm time limit: {text!r}")
    days, first, second, third = match.groups()
    if days is not None:  # days-hours[:minutes[:seconds]]
        minutes = int(days) * 1440 + int(first) * 60 + int(second or 0) + (1 if third and int(third) else 0)
    elif third is not None:  # hours:minutes:seconds
        minutes = int(first) * 60 + int(second) + (1 if int(third) else 0)
    else:  # minutes[:seconds]
        minutes = int(first) + (1 if second and int(second) else 0)
    return minutes


def slurm_partition_max_time_min(partition: str | None) -> int | None:
    """The partition's MaxTime in minutes from ``sinfo`` (``None``: no sinfo, no partition, or unlimited)."""
    if shutil.which("sinfo") is None:
        return None
    command = ["sinfo", "-h", "-o", "%l"] + (["-p", partition] if partition else [])
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=20, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return None
    limits = [parse_slurm_time_min(line) for line in out.split() if line.strip()]
    known = [limit for limit in limits if limit is not None]
    return min(known) if known and len(known) == len(limits) else None


def make_launcher(config: LauncherConfig) -> Launcher:
    if config.kind == "slurm":
        return SlurmLauncher(config)
    return LocalLauncher(config.local_mode)


def stop_recorded_job(stage_dir: str) -> str | None:
    """Stop the job ``stage_dir``'s ``_state.json`` records if it is still active; returns its id."""
    state = read_state(stage_dir)
    record = state.get("job") or {}
    if state.get("status") != "running" or not record:
        return None
    stopped = None
    if record.get("kind") == "slurm":
        handle = slurm_handle(record)
        if handle is not None and not handle.done():
            handle.cancel()
            stopped = record["job_id"]
    elif record.get("kind") == "local" and stop_orphan(int(record["job_id"])):
        stopped = record["job_id"]
    write_state(stage_dir, status="cancelled")
    return stopped


def cancel_outdated_jobs(stage_root: str, current_dir: str) -> list[str]:
    """Cancel jobs still active for other identities of this stage: their inputs are outdated, and
    adopting their result would hand back stale work."""
    cancelled = []
    for stage_dir in identity_dirs(stage_root):
        if os.path.abspath(stage_dir) == os.path.abspath(current_dir):
            continue
        job_id = stop_recorded_job(stage_dir)
        if job_id:
            log.warning("%s: cancelled job %s of outdated identity %s (inputs changed; current identity %s)",
                        os.path.basename(stage_root), job_id, os.path.basename(stage_dir),
                        os.path.basename(current_dir))
            cancelled.append(job_id)
    return cancelled


def wait(handle: JobHandle, poll_interval_s: float, on_tick: Callable[[], None] | None = None) -> Any:
    """Poll until the job ends (calling ``on_tick`` between sleeps), then return its result."""
    while not handle.done():
        if on_tick:
            on_tick()
        time.sleep(poll_interval_s)
    if on_tick:
        on_tick()
    return handle.result()

