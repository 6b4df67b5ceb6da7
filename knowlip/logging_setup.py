"""Logging for every knowlip process: one format, and every record redacted (knowlip.redact) whoever logs it."""

from __future__ import annotations

import logging

from knowlip.redact import redact_logs

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(rank0: bool) -> None:
    """INFO on rank 0 (or a single process), WARNING on the other ranks."""
    logging.basicConfig(level=logging.INFO if rank0 else logging.WARNING, format=FORMAT)
    redact_logs()
