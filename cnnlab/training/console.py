"""What a `cnnlab train` prints on its console: one short line per record, without the
third-party lines that repeat in every job. The job's log file (train.log) keeps everything.

Hydra's job_logging (conf/train.yaml) installs ConsoleHandler, ConsoleFormat and
ThirdPartyNoise on the console handler only; `captured_warnings` sends Python warnings
through logging during a run, so they reach train.log too and the filter can drop the noisy one.
Without Hydra's logging (cnnlab.train from Python, a benchmark's in-process runs) Lightning prints
through its own handler and warnings print themselves: `quiet_third_parties` drops the same lines
there for the run.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

# (logger name, a fragment of the message): lines Lightning and torch print in every run and
# every sweep job that say nothing about this run. Kept in train.log; dropped from the console.
NOISE = (
    ("lightning.pytorch.utilities.rank_zero", "GPU available: "),  # trainer/setup.py _log_device_info
    ("lightning.pytorch.utilities.rank_zero", "TPU available: "),
    ("lightning.pytorch.utilities.rank_zero", "HPU available: "),
    ("lightning.pytorch.utilities.rank_zero", "LitLogger"),  # the litlogger advert (logger_connector.py)
    # Trainer.estimated_stepping_batches, asked for by the learning-rate schedule
    ("lightning.pytorch.utilities.rank_zero", "to estimate number of stepping batches"),
    # torch 2.14 deprecates LeafSpec, which lightning/pytorch/utilities/_pytree.py still uses
    ("py.warnings", "`isinstance(treespec, LeafSpec)` is deprecated"),
    # checkpoint.test=best: cnnlab's first ModelCheckpoint is the best one by construction (trainer.py)
    ("py.warnings", "is called with Trainer configured with multiple `ModelCheckpoint` callbacks"),
)


class ThirdPartyNoise(logging.Filter):
    """Drops the NOISE records (a filter on the console handler, not on the loggers)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(record.name == name and fragment in message for name, fragment in NOISE)


class ConsoleFormat(logging.Formatter):
    """The message alone (the log file has the time and the logger); above INFO, after `warning: `
    (`error: `), except a Python warning, which names itself."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record).rstrip()  # a captured warning ends with a newline of its own
        if record.levelno > logging.INFO and record.name != "py.warnings":
            return f"{record.levelname.lower()}: {text}"
        return text


class ConsoleHandler(logging.StreamHandler):
    """Writes to sys.stdout as it is at the time of each record, not the stream of its creation.
    While the progress bar (cnnlab.training.progress) is drawn, Rich replaces sys.stdout with a
    proxy that prints above the bar, so the log lines scroll up and the bar stays below them; in
    Jupyter, sys.stdout is replaced for every cell. Formats with ConsoleFormat unless told otherwise."""

    def __init__(self, stream=None):  # `stream`: Hydra's default for its console handler; not used
        super().__init__(sys.stdout)
        self.setFormatter(ConsoleFormat())

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stdout  # (emit runs under the handler's lock)
        super().emit(record)


@contextmanager
def captured_warnings() -> Iterator[None]:
    """Python warnings as log records (logger py.warnings) while a run lasts, then as before."""
    before = logging._warnings_showwarning is not None  # whether someone had captured them already
    logging.captureWarnings(True)
    try:
        yield
    finally:
        logging.captureWarnings(before)


@contextmanager
def quiet_third_parties() -> Iterator[None]:
    """For one run outside a Hydra job: the NOISE lines left out of what Lightning's own console
    handlers print, and the noisy Python warnings not shown, unless warnings already go through
    logging (a `cnnlab train` job: its console filter drops them, its train.log keeps them)."""
    import lightning  # noqa: F401  (its loggers and their handlers exist once it is imported)

    noise = ThirdPartyNoise()
    handlers = [h for name in ("lightning.pytorch", "lightning.fabric") for h in logging.getLogger(name).handlers]
    for handler in handlers:
        handler.addFilter(noise)
    try:
        with warnings.catch_warnings():
            if logging._warnings_showwarning is None:  # not captured by logging: they would print as they are
                for name, fragment in NOISE:
                    if name == "py.warnings":
                        warnings.filterwarnings("ignore", message=f".*{re.escape(fragment)}")
            yield
    finally:
        for handler in handlers:
            handler.removeFilter(noise)
