"""Where log lines go. The console shows pruner's own progress (its INFO lines) and every library's warnings and
errors; a job's log file (``<job>/logs/run.log``, :func:`log_file`) gets every record at INFO, the libraries'
included (OpenCLIP's model and argument dump, faiss' loader probing, Ray's start-up lines), for when something needs
explaining. Commands call :func:`setup_console` once; the library itself configures nothing.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterator

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class PrunerProgress(logging.Filter):
    """Lets through pruner's own records at any level and everyone's at WARNING or above."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or record.name.split(".")[0] == "pruner"


def setup_console() -> None:
    """Configure the root logger for a command: records at INFO and above pass it, and one console handler (stderr)
    shows those :class:`PrunerProgress` lets through. Idempotent."""
    root = logging.getLogger()
    if any(isinstance(f, PrunerProgress) for h in root.handlers for f in h.filters):
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(PrunerProgress())
    root.addHandler(handler)
    root.setLevel(logging.INFO)


@contextlib.contextmanager
def log_file(path: Path) -> Iterator[Path]:
    """Every record at INFO or above (the root logger's level, :func:`setup_console`) also goes to ``path``, appended,
    while the block runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield path
    finally:
        root.removeHandler(handler)
        handler.close()
