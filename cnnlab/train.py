"""`cnnlab train` and `python -m cnnlab.train`: the Hydra app around cnnlab.training.run.train.

A single run's bad input exits 2 with one line; a sweep job's failure is recorded as a FAILED
child run and the sweep goes on (the job returns NaN to the sweeper).
"""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from cnnlab.config.compose import CONF_DIR
from cnnlab.errors import ConfigError, RunInUse, TrainingError, fail
from cnnlab.training.checks import refuse_object_overrides
from cnnlab.training.console import captured_warnings
from cnnlab.training.naming import in_multirun
from cnnlab.training.run import record_failure, train

log = logging.getLogger("cnnlab")


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    sweeping = in_multirun()
    try:
        with captured_warnings():  # in the job's log file too; on the console less the noise (conf/train.yaml)
            return train(cfg).score  # what a sweeper (Optuna) optimises
    except (TrainingError, ConfigError) as error:
        if not sweeping:
            sys.exit(fail(error))
        log.error("job failed: %s", error)  # a TrainingError's run is already marked FAILED
        if isinstance(error, ConfigError) and not isinstance(error, RunInUse) and cfg.tracking.enabled:
            record_failure(cfg, error)  # (a run in use belongs to the process training it)
    except Exception:
        if not sweeping:
            raise
        log.exception("job failed; its MLflow run is marked FAILED and the sweep goes on")
    return float("nan")


def cli_main() -> None:
    """Refuse object overrides, then run Hydra."""
    try:
        refuse_object_overrides(sys.argv[1:])
    except ConfigError as error:
        sys.exit(fail(error))
    main()


if __name__ == "__main__":
    cli_main()
