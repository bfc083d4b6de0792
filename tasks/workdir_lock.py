"""One writer per run directory: the lock that ``run``, ``resume`` and deployment runs take.

``<work_dir>/.lock`` is created with ``O_EXCL`` and holds the holder's host, pid, process start time and
command. A second run on the same directory refuses with a message naming the holder. A lock whose holder
is gone (same host, and the pid is dead or belongs to a later process) is stale and taken over; a lock
held from another host cannot be checked from here and is never broken silently.

The lock is what makes it safe for a run to stop jobs left behind by an earlier run of the same
directory: while a live run holds it, no other run touches its jobs, its records or ``mlflow.db``.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from dataclasses import dataclass
from typing import Any

LOCK_NAME = ".lock"
_DEPTH: dict[str, int] = {}  # acquisitions held by this process, per lock file (the lock is re-entrant)


class WorkDirLocked(RuntimeError):
    """Another live run holds the run directory."""


def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), or ``None`` if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
            return handle.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _holder() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "process_start": _process_start(os.getpid()),
            "command": " ".join(sys.argv)[:300]}


def _is_stale(holder: dict[str, Any]) -> bool:
    if holder.get("host") != socket.gethostname():
        return False
    started = _process_start(int(holder.get("pid", -1)))
    return started is None or started != holder.get("process_start")


@dataclass
class WorkDirLock:
    """``with WorkDirLock(work_dir): ...``; re-entrant within one process (the CLI takes it, then the flow
    it runs takes it again): the file goes when the last acquisition of this process is released."""

    work_dir: str

    @property
    def path(self) -> str:
        return os.path.join(self.work_dir, LOCK_NAME)

    def read(self) -> dict[str, Any] | None:
        try:
            with open(self.path, encoding="utf-8") as handle:
                return json.load(handle)
        except (OSError, ValueError):
            return None

    def held_by_me(self) -> bool:
        holder = self.read() or {}
        return holder.get("host") == socket.gethostname() and holder.get("pid") == os.getpid() \
            and holder.get("process_start") == _process_start(os.getpid())

    def held_by_another_live_process(self) -> bool:
        holder = self.read()
        return holder is not None and not self.held_by_me() and not _is_stale(holder)

    def acquire(self) -> WorkDirLock:
        os.makedirs(self.work_dir, exist_ok=True)
        if self.held_by_me():
            _DEPTH[self.path] = _DEPTH.get(self.path, 0) + 1
            return self
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self.read()
                if holder is None or _is_stale(holder):
                    # dead holder (or a lock file cut short by a crash): take it over
                    try:
                        os.unlink(self.path)
                    except FileNotFoundError:
                        pass
                    continue
                raise WorkDirLocked(
                    f"{self.work_dir} is in use by another run: pid {holder.get('pid')} on {holder.get('host')} "
                    f"({holder.get('command')!r}). Wait for it to finish or cancel it; if that process is gone "
                    f"(e.g. its machine died), delete {self.path}."
                ) from None
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(_holder(), handle)
            _DEPTH[self.path] = 1
            return self
        raise WorkDirLocked(f"{self.work_dir}: could not take {self.path} (another run raced for it)")

    def release(self) -> None:
        """Give back one acquisition of this process (no-op when this process does not hold the lock)."""
        depth = _DEPTH.get(self.path, 0) - 1
        if depth > 0:
            _DEPTH[self.path] = depth
            return
        _DEPTH.pop(self.path, None)
        if depth == 0 and self.held_by_me():
            os.unlink(self.path)

    def __enter__(self) -> WorkDirLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
