"""Save a checkpoint when the scheduler announces the end of the job (time limit or preemption).

Slurm warns a job before killing it: ``--signal=USR2@<seconds>`` before the time limit (what submitit
asks for) and SIGTERM on preemption. :class:`SaveOnSignal` replaces the handlers of the configured
signals with one that only records the signal (a handler runs between two bytecodes of the training
loop, where a collective checkpoint cannot start); the loop asks :meth:`SaveOnSignal.agreed_signal`
after each step, which all-reduces (MAX) the recorded signal so that every rank stops at the same
iteration even when the signal reached only some of them. After the checkpoint is written,
:meth:`SaveOnSignal.hand_over` passes the signal on to whoever handled it before the trainer:

- a Python handler (submitit's, which calls the job's ``checkpoint()``, requeues and exits): it is
  called; if it returns, training continues with the trainer's handler back in place;
- ``SIG_IGN``: the signal was meant to be ignored, training continues;
- ``SIG_DFL`` (no launcher): the process exits with :data:`SAVED_ON_SIGNAL_EXIT_CODE`.

dinov2_core stays free of submitit: the hand-over goes through the ``signal`` module only.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any, Callable

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

#: ``EX_TEMPFAIL`` of sysexits.h: the run stopped after saving because it was told to, run it again to resume.
SAVED_ON_SIGNAL_EXIT_CODE = 75

_Handler = Callable[[int, FrameType | None], Any] | int | None


class SavedOnSignalExit(SystemExit):
    """Raised after the checkpoint when no previous handler takes the signal over."""

    def __init__(self, signum: int, iteration: int) -> None:
        super().__init__(SAVED_ON_SIGNAL_EXIT_CODE)
        self.signum = signum
        self.iteration = iteration

    def __str__(self) -> str:
        return (f"saved checkpoint {self.iteration} on {signal.Signals(self.signum).name}; exiting with status "
                f"{SAVED_ON_SIGNAL_EXIT_CODE} (run the same command again to resume)")


def parse_signal(name: str) -> signal.Signals:
    """``"SIGUSR2"`` / ``"USR2"`` → ``signal.SIGUSR2``; ``ValueError`` naming the allowed values otherwise."""
    key = name.upper() if name.upper().startswith("SIG") else f"SIG{name.upper()}"
    allowed = sorted(s.name for s in signal.Signals if s not in (signal.SIGKILL, signal.SIGSTOP))
    if key not in allowed:
        raise ValueError(f"{name!r} is not a signal that can be handled; allowed: {allowed}")
    return signal.Signals[key]


class SaveOnSignal:
    """Record the configured signals while installed; see the module docstring for the protocol."""

    def __init__(self, signal_names: list[str] | tuple[str, ...]) -> None:
        self.signals = [parse_signal(name) for name in signal_names]
        self.received = 0  # the last signal number recorded on this rank, 0 = none
        self._previous: dict[int, _Handler] = {}

    def install(self) -> "SaveOnSignal":
        # signal.signal only works in the main thread; a trainer run from a worker thread cannot be warned.
        if threading.current_thread() is not threading.main_thread():
            if self.signals:
                log.warning("not in the main thread: no checkpoint on %s", [s.name for s in self.signals])
            return self
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._record)
        return self

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def __enter__(self) -> "SaveOnSignal":
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    def agreed_signal(self, device: torch.device) -> int:
        """Collective: the signal recorded on any rank (the largest number if they differ), or 0."""
        if not self._previous:
            return 0
        flag = torch.tensor([self.received], dtype=torch.int32, device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    def hand_over(self, signum: int, iteration: int) -> None:
        """After the checkpoint of ``iteration``: run the previous handler of ``signum`` (see the module docs)."""
        self.received = 0
        previous = self._previous.get(signum, signal.SIG_DFL)
        name = signal.Signals(signum).name
        if previous is signal.SIG_IGN:
            log.info("%s: checkpoint %d written; the signal was ignored before, training continues", name, iteration)
            return
        if callable(previous):
            log.info("%s: checkpoint %d written; handing the signal to %r", name, iteration, previous)
            self.uninstall()  # the previous handler may requeue and exit; it must not find ours in place
            previous(signum, None)
            # It returned (submitit does on ranks other than 0, and for SIGTERM): it lets the job go on.
            self.install()
            return
        raise SavedOnSignalExit(signum, iteration)
