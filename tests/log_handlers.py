"""Hydra's app adds log handlers for its job to the root, `lightning` and `cnnlab` loggers; a test
that runs `cnnlab train` in this process puts them back as they were."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def handlers_restored() -> Iterator[None]:
    loggers = [logging.getLogger(), logging.getLogger("lightning"), logging.getLogger("cnnlab")]
    saved = [(logger, list(logger.handlers), logger.level) for logger in loggers]
    try:
        yield
    finally:
        for logger, handlers, level in saved:
            for handler in set(logger.handlers) - set(handlers):
                handler.close()
            logger.handlers[:] = handlers
            logger.setLevel(level)
