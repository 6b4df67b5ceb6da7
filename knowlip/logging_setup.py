"""Logging for every knowlip process: one format (time, level, rank, message) on stderr, every record redacted
(knowlip.redact) whoever logs it, INFO from rank 0 only unless asked, and the libraries' own loggers routed
into it: DeepSpeed's (which prints to stdout in its own format) and MLflow's, at WARNING unless the level asked
for is DEBUG. Optionally the same records as JSON lines in a file, for machines."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from knowlip.redact import redact_logs

FORMAT = "%(asctime)s %(levelname)s [rank %(rank)s] %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
LIBRARIES = ("DeepSpeed", "mlflow", "torch.distributed", "urllib3", "alembic", "sqlalchemy")


class _RankFilter(logging.Filter):
    def __init__(self, rank: int | str):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return True


class _JsonLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({"time": round(record.created, 3), "level": record.levelname, "rank": record.rank,
                           "logger": record.name, "message": record.getMessage()})


class _Routed(logging.Logger):
    """DeepSpeed's logger: it adds a stdout handler of its own, turns propagation off and sets its level when it
    is imported; here those are ignored, so that its records reach our handler in our format."""

    propagate = property(lambda self: True, lambda self, value: None)

    def addHandler(self, handler) -> None:  # noqa: N802 (logging's name)
        pass

    def setLevel(self, level) -> None:  # noqa: N802
        if not getattr(self, "_knowlip_level_set", False):
            super().setLevel(level)

    def set_level_from_knowlip(self, level: int) -> None:
        super().setLevel(level)
        self._knowlip_level_set = True


def _route_deepspeed(level: int) -> None:
    existing = logging.Logger.manager.loggerDict.get("DeepSpeed")
    if isinstance(existing, logging.Logger) and not isinstance(existing, _Routed):  # imported before us
        existing.handlers.clear()
        existing.propagate = True
        existing.setLevel(level)
        return
    previous = logging.getLoggerClass()
    logging.setLoggerClass(_Routed)
    try:
        routed = logging.getLogger("DeepSpeed")
    finally:
        logging.setLoggerClass(previous)
    if isinstance(routed, _Routed):
        routed.set_level_from_knowlip(level)


def configure_logging(rank: int | None = 0, level: str = "INFO", all_ranks: bool = False,
                      json_path: str | Path | None = None) -> None:
    """`level` on rank 0 (or a single process, rank None), WARNING on the other ranks unless `all_ranks`."""
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")  # MLflow's records come to our handler
    if "DS_ACCELERATOR" not in os.environ and not Path("/dev/nvidia0").exists():
        os.environ["DS_ACCELERATOR"] = "cpu"  # no GPU here: spares DeepSpeed's "unable to detect it" warning
    wanted = logging.getLevelName(level.upper())
    if not isinstance(wanted, int):
        raise ValueError(f"log level {level!r} is not one of DEBUG, INFO, WARNING, ERROR")
    mine = wanted if (rank in (None, 0) or all_ranks) else max(wanted, logging.WARNING)
    libraries = logging.DEBUG if wanted <= logging.DEBUG else logging.WARNING
    root = logging.getLogger()
    for handler in list(root.handlers):  # ours from an earlier call, or a library's basicConfig on the console
        console_stream = getattr(handler, "stream", None) in (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__)
        if getattr(handler, "knowlip", False) or (type(handler) is logging.StreamHandler and console_stream):
            root.removeHandler(handler)
    rank_filter = _RankFilter(rank if rank is not None else 0)
    console = logging.StreamHandler()
    console.knowlip = True
    console.setFormatter(logging.Formatter(FORMAT, DATE_FORMAT))
    console.addFilter(rank_filter)
    root.addHandler(console)
    if json_path:
        path = Path(json_path)
        if rank not in (None, 0):
            path = path.with_name(f"{path.stem}.rank{rank}{path.suffix}")
        path.parent.mkdir(parents=True, exist_ok=True)
        machine = logging.FileHandler(path)
        machine.knowlip = True
        machine.setFormatter(_JsonLines())
        machine.addFilter(rank_filter)
        root.addHandler(machine)
    root.setLevel(mine)
    _route_deepspeed(max(libraries, mine))
    for name in LIBRARIES[1:]:
        logging.getLogger(name).setLevel(max(libraries, mine))
    redact_logs()
