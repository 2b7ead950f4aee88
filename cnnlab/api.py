"""cnnlab from Python (a notebook, a script): `train`, `summary` and `compare`, as the commands do them.

    import cnnlab
    result = cnnlab.train(["data=synthetic", "trainer.max_epochs=1"])
    result.run_id, result.metrics, result.history

Every function takes the overrides the command line takes and composes the same config, so
`cnnlab.train([...])` is the run `cnnlab train ...` makes: the same run name and run folder (running
either again finds it and resumes or returns it), the same MLflow store. Bad input is the one-line
ConfigError the command prints, raised before anything is written.
"""

from __future__ import annotations

import copy
import logging
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cnnlab.errors import ConfigError, error_text
from cnnlab.training.result import Result

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from cnnlab.results.compare import Comparison

__all__ = ["Result", "compare", "summary", "train"]

log = logging.getLogger("cnnlab")


def train(overrides: Sequence[str] | Mapping[str, Any] | None = None, **kw: Any) -> Result:
    """Train, test and track one run, as `cnnlab train OVERRIDES` does; return its Result.

    `overrides`: command-line overrides (`["data=synthetic", "model.bn=false"]`) or a mapping
    (`{"data": "synthetic", "model.widths": [8], "trainer.max_epochs": 1}`); keyword arguments add
    more (`seed=1`). A finished run asked for again is not trained again: its Result is read back.
    The run's log lines (its MLflow run, one line per epoch, the final one) go to sys.stdout as it
    is when each is written, so a notebook shows them under the cell.
    """
    argv = override_list(overrides, kw)
    with _bad_input():
        from cnnlab.config.compose import compose
        from cnnlab.training.checks import preflight, refuse_object_overrides
        from cnnlab.training.distributed import starts_ranks_by_command

        refuse_object_overrides(argv)  # before anything composes them
        job = compose(argv, with_hydra=True)
        if starts_ranks_by_command(str(job.trainer.strategy)):
            raise ConfigError(f"trainer.strategy={job.trainer.strategy} starts each extra rank by running "
                              f"the command again, and a Python session has no command to run: use "
                              f"`cnnlab train` for it, or trainer.strategy=ddp_spawn (ddp_notebook in Jupyter)")
        # The command's own checks: the config and model, the output folder and the tracking store.
        # Nothing is written before they pass.
        preflight(argv)
    from cnnlab.training.run import train as train_run

    with _as_hydra_job(job) as (cfg, in_hydra_app), _log_to_stdout(enabled=not in_hydra_app):
        # The "command" tag says how the run was made (sys.argv would name the notebook's kernel).
        return train_run(cfg, tags={"command": f"cnnlab.train({argv!r})"})


def summary(overrides: Sequence[str] | Mapping[str, Any] | None = None, **kw: Any) -> str:
    """The Keras-style table `cnnlab summary OVERRIDES` prints, computed from the config alone."""
    from cnnlab.config.compose import compose
    from cnnlab.model.plan import model_plan
    from cnnlab.model.summary import summary_text

    argv = override_list(overrides, kw)
    with _bad_input():
        cfg = compose(argv)
    return summary_text(model_plan(cfg))


def compare(experiment: str, runs: str | Path = "runs", *, uri: str | None = None,
            out: str | Path | None = None, **options: Any) -> Comparison:
    """The comparison `cnnlab compare EXPERIMENT` prints: `experiment` is an MLflow experiment's name
    or a sweep's parent run id; `runs` the runs root holding mlflow.db (or `uri`, a tracking URI);
    `options`: metric, reference, all_pairs, effect, include_checks (as the command's flags);
    `out`: also write .txt/.md/.csv/.tex and plots there. Print `.text()` (or `.markdown()`,
    `.latex()`, `.csv()`); `.table` is the pandas DataFrame, `.pairs` the paired tests."""
    from cnnlab.results.compare import compare as compare_runs
    from cnnlab.results.compare import target, write_outputs
    from cnnlab.tracking.store import existing_store

    store = existing_store(runs, uri)
    result = compare_runs(store, **target(experiment), **options)
    if out is not None:
        write_outputs(result, Path(out), store)
    return result


def override_list(overrides: Sequence[str] | Mapping[str, Any] | None, kw: Mapping[str, Any]) -> list[str]:
    """Command-line overrides from a list of them, a mapping and keyword arguments. A mapping's
    string values are written as on the command line; lists, numbers, booleans and None as Hydra
    reads them (`[8, 16]` -> `[8,16]`, True -> `true`, None -> `null`)."""
    if isinstance(overrides, (str, bytes)):
        raise ConfigError(f"overrides must be a list of 'key=value' strings or a mapping, got the string "
                          f"{overrides!r}; write [{overrides!r}]")
    if overrides is None:
        found = []
    elif isinstance(overrides, Mapping):
        found = [f"{key}={_value(value)}" for key, value in overrides.items()]
    else:
        found = list(overrides)
    found += [f"{key}={_value(value)}" for key, value in kw.items()]
    for item in found:
        if not isinstance(item, str):
            raise ConfigError(f"an override must be a 'key=value' string, got {item!r} ({type(item).__name__})")
        if item.startswith("-") or item.lstrip("+~").startswith("hydra.mode"):
            raise ConfigError(f"cnnlab's Python API takes overrides only, not {item!r}, and trains one run "
                              f"per call; run a sweep with `cnnlab train -m ...`")
    return found


def _value(value: Any) -> str:
    """A Python value as a Hydra override writes it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (str, int, float, Path)):
        return str(value)
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_value(v) for v in value) + "]"
    raise ConfigError(f"cannot write {value!r} ({type(value).__name__}) as an override value; "
                      f"use a string, number, boolean, None, list or dict")


@contextmanager
def _bad_input() -> Iterator[None]:
    """Hydra's and OmegaConf's errors about an override as the command's one line."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        yield
    except (HydraException, OmegaConfBaseException) as error:
        raise ConfigError(error_text(error)) from error


@contextmanager
def _as_hydra_job(job: DictConfig) -> Iterator[tuple[DictConfig, bool]]:
    """What Hydra's app does around a job, without its files and logging: HydraConfig set, so the
    run's name, folder (`hydra.run.dir`) and overrides are those `cnnlab train` gives it; the job's
    config without the hydra node. HydraConfig is put back afterwards (a caller's own Hydra app
    keeps its own). Yields the config and whether a Hydra app was running already."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict, read_write

    hydra_config = HydraConfig.instance()
    before = hydra_config.cfg
    try:
        hydra_config.set_config(job)  # the run dir's ${hydra:job.override_dirname} resolves from it
        with read_write(job.hydra.runtime):
            job.hydra.runtime.output_dir = os.path.abspath(str(job.hydra.run.dir))
        hydra_config.set_config(job)
        cfg = copy.deepcopy(job)
        with read_write(cfg), open_dict(cfg):
            del cfg["hydra"]
        yield cfg, before is not None
    finally:
        hydra_config.cfg = before


@contextmanager
def _log_to_stdout(enabled: bool) -> Iterator[None]:
    """cnnlab's INFO lines to the current sys.stdout for one call, unless a handler of the logger
    (or of its ancestors) already shows them on the current stdout or stderr (a caller's
    logging.basicConfig), or a Hydra app configured logging (enabled=False)."""
    if not enabled or _shown(log):
        yield
        return
    from cnnlab.training.console import ConsoleHandler

    handler = ConsoleHandler()  # the message to sys.stdout as it is then (Jupyter replaces it for every cell)
    level = log.level
    if level == logging.NOTSET and log.getEffectiveLevel() > logging.INFO:
        log.setLevel(logging.INFO)  # Python's default (WARNING) would drop the epoch lines
    log.addHandler(handler)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def _shown(logger: logging.Logger) -> bool:
    from cnnlab.training.console import ConsoleHandler

    streams = (sys.stdout, sys.stderr)
    current: logging.Logger | None = logger
    while current is not None:
        # A ConsoleHandler (one a `cnnlab train` in this process left on the root) writes to sys.stdout as it is now.
        if any(isinstance(h, logging.StreamHandler) and (isinstance(h, ConsoleHandler) or h.stream in streams)
               and h.level <= logging.INFO for h in current.handlers):
            return True
        current = current.parent if current.propagate else None
    return False
