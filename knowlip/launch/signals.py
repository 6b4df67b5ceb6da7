"""Preemption-safe stopping: a signal only sets a flag; the trainer acts on it at the next step boundary,
after every rank agreed (so that all of them save one checkpoint together and exit).

SIGINT (Ctrl-C) is a stop like SIGTERM the first time; a second SIGINT ends the process at once (exit 130,
no save: the previous checkpoint stays the one to resume)."""

from __future__ import annotations

import os
import signal
import sys
import time

# SIGUSR2: Slurm's signal before a time limit (--signal=USR2@delay, as submitit asks); SIGTERM: preemption or
# a cancel; SIGINT: Ctrl-C.
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)
INTERRUPTED_EXIT = 130  # 128 + SIGINT, as a shell reports a Ctrl-C


def ignore_stop_signals(*_args) -> None:
    """For helper processes (loader workers): Slurm signals every process of a job step, and a worker killed by
    USR2 would break the loader before the rank could save; they end with their rank instead."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


class StopRequest:
    def __init__(self, announce: bool = True) -> None:
        self.signum: int | None = None
        self.announce = announce  # say what a Ctrl-C does (rank 0)

    def install(self) -> "StopRequest":
        for s in STOP_SIGNALS:
            signal.signal(s, self._handle)
        return self

    def _handle(self, signum, _frame) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            self._say("second interrupt: stopping now, without saving")
            os._exit(INTERRUPTED_EXIT)
        if signum == signal.SIGINT:
            self._say("interrupted: saving a checkpoint at the end of this step (Ctrl-C again to stop at once, "
                      "without saving)")
        self.signum = signum  # nothing else: a handler may run at any bytecode, even inside a collective

    def _say(self, message: str) -> None:
        """One line in the log's format, written directly (the logging module's locks are not for handlers)."""
        if self.announce:
            line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} WARNING [rank 0] {message}\n"
            os.write(sys.stderr.fileno(), line.encode())

    def request(self, signum: int = signal.SIGUSR1) -> None:
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""
