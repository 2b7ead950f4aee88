"""`cnnlab train` and `python -m cnnlab.train`: the Hydra app around cnnlab.training.run.train.

A single run's bad input exits 2 with one line; a sweep job's failure is recorded as a FAILED
child run and the sweep goes on (the job returns NaN to the sweeper).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from cnnlab.config.compose import CONF_DIR
from cnnlab.errors import CodeChanged, ConfigError, RunInUse, TrainingError, fail
from cnnlab.training.checks import refuse_object_overrides
from cnnlab.training.console import captured_warnings
from cnnlab.training.naming import in_multirun
from cnnlab.training.run import record_failure, train

log = logging.getLogger("cnnlab")


# Config values that name files or folders; a relative one means the folder the command started in.
PATH_KEYS = ("paths.runs", "paths.cache", "data.root", "data.archive", "ckpt_path")


def paths_from_launch_folder(cfg: DictConfig) -> None:
    """With hydra.job.chdir=true the job runs inside its output folder, so a relative paths.runs
    would put the MLflow store and run folders inside that folder (runs/outputs/.../runs/...),
    out of sight of the next command. Relative paths are made absolute against the folder the
    command started in (Hydra's original cwd), as they are without chdir."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd

    if not HydraConfig.get().job.chdir:
        return
    launch = Path(get_original_cwd())
    for key in PATH_KEYS:  # paths.runs first: paths.data and data.root follow it by interpolation
        value = OmegaConf.select(cfg, key)
        if isinstance(value, str) and not Path(os.path.expanduser(value)).is_absolute():
            OmegaConf.update(cfg, key, str(launch / value))


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    sweeping = in_multirun()
    try:
        paths_from_launch_folder(cfg)
        with captured_warnings():  # in the job's log file too; on the console less the noise (conf/train.yaml)
            return train(cfg).score  # what a sweeper (Optuna) optimises
    except (TrainingError, ConfigError) as error:
        if not sweeping:
            sys.exit(fail(error))
        log.error("job failed: %s", error)  # a TrainingError's run is already marked FAILED
        if isinstance(error, ConfigError) and not isinstance(error, (RunInUse, CodeChanged)) and cfg.tracking.enabled:
            record_failure(cfg, error)  # (a run in use, or one not continued, is left as it is)
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
