"""The `compress` logger: lines go to stdout (without breaking progress bars) and to the run's log."""

from __future__ import annotations

import logging
from pathlib import Path

from tqdm import tqdm

logger = logging.getLogger("compress")


class _TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record))


def setup_logging(run_log: Path | None = None) -> None:
    """Log INFO to stdout once per process, and append to `run_log` (timestamped) if given.

    A process writes one run's log at a time: a new `run_log` (the next run of a script that runs
    several) closes the previous one's file.
    """
    logger.setLevel(logging.INFO)
    logger.propagate = False
    if not any(isinstance(h, _TqdmHandler) for h in logger.handlers):
        logger.addHandler(_TqdmHandler())
    if run_log is not None:
        path = str(Path(run_log).resolve())
        for old in [h for h in logger.handlers if isinstance(h, logging.FileHandler)]:
            if old.baseFilename != path:
                logger.removeHandler(old)
                old.close()
        if not any(getattr(h, "baseFilename", None) == path for h in logger.handlers):
            handler = logging.FileHandler(path)
            handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
            logger.addHandler(handler)
