"""Preemption-safe stopping: a signal only sets a flag; the trainer acts on it at the next step boundary,
after every rank agreed (so that all of them save one checkpoint together and exit)."""

from __future__ import annotations

import signal

# SIGUSR2: Slurm's signal before a time limit (--signal=USR2@delay, as submitit asks); SIGTERM: preemption.
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)


def ignore_stop_signals(*_args) -> None:
    """For helper processes (loader workers): Slurm signals every process of a job step, and a worker killed by
    USR2 would break the loader before the rank could save; they end with their rank instead."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


class StopRequest:
    def __init__(self) -> None:
        self.signum: int | None = None

    def install(self) -> "StopRequest":
        for s in STOP_SIGNALS:
            signal.signal(s, self._handle)
        return self

    def _handle(self, signum, _frame) -> None:
        self.signum = signum  # nothing else: a handler may run at any bytecode, even inside a collective

    def request(self, signum: int = signal.SIGUSR1) -> None:
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""
