"""`hydra/launcher=stacked`: a multirun's jobs that differ only in `seed` trained as stacks.

`cnnlab train -m experiment=rf hydra/launcher=stacked trainer.accelerator=gpu` has 6 jobs (2
variants x 3 seeds); this launcher trains 2 stacked jobs of 3 seeds (cnnlab.training.stacked_run)
instead. Every job still passes through Hydra's `run_job` (its folder, .hydra/ files, log file
and the sweep's callbacks), so each seed's run sits in its own job folder and is a child of the
sweep's MLflow parent run (cnnlab.training.sweep) exactly as it would be with the basic launcher;
only the training of a group happens once, after all of its jobs were prepared.

Settings (conf/hydra/launcher/stacked.yaml): `max_stack` seeds per stack at most; the stack size
is also bounded by `stacked_memory_bytes` (parameters, gradients, optimizer state, activations x
batch x stack) plus each seed's data against `memory_fraction` of the device's free memory;
`stack: auto` stacks only on an accelerator (the CPU gains nothing: stacked_run.CPU_STACKING),
`stack: force` stacks on the CPU too. Jobs that cannot be stacked
(a layer, a setting, a single seed) run one job each, with one line saying why.

Logs: Hydra gives each job its log file (<job folder>/train.log) while it prepares the job, so
the stack's training would log only to the last prepared job's file. For the stack each job's
file gets the stack's lines instead (`each_job_logs`): the shared ones and its own seed's, not the
"seed N ..." lines of the stack's other seeds.

Hydra only accepts launcher classes from the `hydra_plugins` package: the class Hydra
instantiates is hydra_plugins/cnnlab_stacked_launcher/stacked_launcher.py, which only delegates
here.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger("cnnlab")

STACK_MODES = ("auto", "force")
# cnnlab.training.stacked_run starts every line about one seed with "seed <n>" (its epoch lines,
# early stopping, a masked seed, its result).
SEED_LINE = re.compile(r"seed (-?\d+)\b")


def _task_config(config: DictConfig) -> DictConfig:
    task = OmegaConf.create(OmegaConf.to_container(config, resolve=False))
    with open_dict(task):
        task.pop("hydra", None)
    return task


def group_key(overrides: Sequence[str]) -> tuple[str, ...]:
    """Jobs with the same key differ only in seed."""
    return tuple(sorted(o for o in overrides if o.lstrip("+~").split("=", 1)[0] != "seed"))


def free_device_bytes(device: str) -> int | None:
    """Free memory of the device a stack would train on; None where it is not known (CPU)."""
    import torch

    if device == "cuda":
        return int(torch.cuda.mem_get_info()[0])
    return None


def stack_size(cfg: DictConfig, seeds: int, max_stack: int, memory_fraction: float, device: str) -> int:
    """How many seeds one stack takes: max_stack, fewer when the memory estimate says so."""
    from cnnlab.config.compose import container
    from cnnlab.model.plan import model_plan
    from cnnlab.model.stacked import stacked_memory_bytes

    size = min(seeds, max_stack)
    free = free_device_bytes(device)
    if free is None:
        return size
    data = container(cfg.data)
    analysis = model_plan(cfg).analysis
    per_image = math.prod(data["shape"])  # uint8 on the device
    images = data.get("subset") or data.get("n_train") or 60000  # an upper bound for the named sets
    data_bytes = per_image * (images + 10000)
    budget = free * memory_fraction
    dtype_bytes = 8 if str(cfg.trainer.precision) in ("64", "64-true") else 4  # bf16: 4 is an upper bound
    def needed(stack: int) -> int:
        return (stacked_memory_bytes(analysis, data["batch_size"], stack, cfg.optim.name, dtype_bytes)
                + stack * data_bytes)

    while size > 1 and needed(size) > budget:
        size -= 1
    return size


def plan_stacks(configs: Sequence[DictConfig], overrides: Sequence[Sequence[str]], max_stack: int,
                stack: str, memory_fraction: float) -> list[list[int]]:
    """The jobs (indices) to train together, in order; a list of one is a job trained alone."""
    from cnnlab.config.compose import container
    from cnnlab.errors import ConfigError
    from cnnlab.training.stacked_run import CPU_STACKING, stack_device, stacking_problem

    if stack not in STACK_MODES:
        raise ConfigError(f"hydra.launcher.stack must be one of {', '.join(STACK_MODES)}, got {stack!r}")
    if not (isinstance(max_stack, int) and max_stack >= 1):
        raise ConfigError(f"hydra.launcher.max_stack must be an integer >= 1, got {max_stack!r}")
    groups: dict[tuple[str, ...], list[int]] = {}
    for index, job in enumerate(overrides):
        groups.setdefault(group_key(job), []).append(index)
    planned: list[list[int]] = []
    for key, members in groups.items():
        what = " ".join(key) or "(no overrides)"
        cfg = _task_config(configs[members[0]])
        why = None
        if len(members) == 1:
            why = "a single seed"
        elif cfg.get("seeds") is not None:
            why = "its jobs set seeds=[...] and stack those themselves"
        else:
            try:
                why = stacking_problem(cfg)
                device = stack_device(container(cfg.trainer))
            except ConfigError as error:  # the job itself reports it, as with any launcher
                why = f"its config is refused ({error})"
            if why is None and device == "cpu" and stack != "force":
                why = f"{CPU_STACKING}; hydra.launcher.stack=force stacks anyway"
        if why is not None:
            log.info("stacked launcher: %d job(s) of %s run one by one: %s", len(members), what, why)
            planned += [[i] for i in members]
            continue
        size = stack_size(cfg, len(members), max_stack, memory_fraction, device)
        chunks = [members[i:i + size] for i in range(0, len(members), size)]
        log.info("stacked launcher: %s: %d seeds in %d stack(s) of up to %d", what, len(members), len(chunks), size)
        planned += chunks
    return planned


def job_log_files() -> list[logging.FileHandler]:
    """The root logger's file handlers now: the job's log file, while Hydra runs that job."""
    return [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]


class OtherSeeds(logging.Filter):
    """Leaves out the lines about the stack's other seeds (a seed's log file keeps its own and the shared)."""

    def __init__(self, seed: int):
        super().__init__()
        self.seed = seed

    def filter(self, record: logging.LogRecord) -> bool:
        about = SEED_LINE.match(record.getMessage())
        return about is None or int(about.group(1)) == self.seed


@contextmanager
def each_job_logs(files: Sequence[tuple[int, Sequence[logging.FileHandler]]]) -> Iterator[None]:
    """While a stack trains: for each (seed, its job's file handlers), a handler on the same file
    (appending, same formatter and level) with the OtherSeeds filter, in place of those of the root
    (the last prepared job's). The root's handlers are put back as they were afterwards."""
    root = logging.getLogger()
    before = list(root.handlers)
    added = []
    for seed, handlers in files:
        for handler in handlers:
            own = logging.FileHandler(handler.baseFilename, mode="a", encoding=handler.encoding, delay=True)
            own.setFormatter(handler.formatter)
            own.setLevel(handler.level)
            own.addFilter(OtherSeeds(seed))
            added.append(own)
    jobs = [handler for _, handlers in files for handler in handlers]
    try:
        for handler in before:
            if any(handler is job for job in jobs):
                root.removeHandler(handler)
        for handler in added:
            root.addHandler(handler)
        yield
    finally:
        for handler in added:
            root.removeHandler(handler)
            handler.close()
        root.handlers[:] = before


def launch(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list:
    """The launcher's `launch`: Hydra's BasicLauncher, with groups of seeds trained as stacks."""
    from pathlib import Path

    from hydra.core.utils import JobStatus, configure_log, filter_overrides, run_job, setup_globals

    from cnnlab.training.stacked_run import SeedJob, train_stacked

    setup_globals()
    configure_log(launcher.config.hydra.hydra_logging, launcher.config.hydra.verbose)
    Path(str(launcher.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
    configs = []
    for offset, overrides in enumerate(job_overrides):
        index = initial_job_idx + offset
        log.info("\t#%d : %s", index, " ".join(filter_overrides(overrides)))
        config = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, list(overrides))
        with open_dict(config):
            config.hydra.job.id = index
            config.hydra.job.num = index
        configs.append(config)
    settings = launcher.settings
    from cnnlab.errors import ConfigError
    from cnnlab.model.stacked import DROPOUT_MODES

    if settings["dropout_mode"] not in DROPOUT_MODES:
        raise ConfigError(f"hydra.launcher.dropout_mode must be one of {', '.join(DROPOUT_MODES)}, "
                          f"got {settings['dropout_mode']!r}")
    returns: list = [None] * len(configs)

    def run(index: int, task_function):
        return run_job(hydra_context=launcher.hydra_context, task_function=task_function, config=configs[index],
                       job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")

    for chunk in plan_stacks(configs, job_overrides, settings["max_stack"], settings["stack"],
                             settings["memory_fraction"]):
        if len(chunk) == 1:
            returns[chunk[0]] = run(chunk[0], launcher.task_function)
        else:
            jobs: list[SeedJob] = []
            logs: list = []
            # Each job of the stack through run_job: its folder, .hydra/, callbacks, log file, and the
            # SeedJob made while Hydra's config is that job's (its overrides, folder, sweep parent).
            for index in chunk:
                def prepare(cfg, jobs=jobs, logs=logs):
                    jobs.append(SeedJob.current(cfg))
                    logs.append((jobs[-1].seed, job_log_files()))

                returns[index] = run(index, prepare)
                if returns[index].status != JobStatus.COMPLETED:
                    raise returns[index].return_value  # preparing a job failed: Hydra's own error
            with each_job_logs(logs):
                try:
                    scores = train_stacked(jobs, dropout_mode=settings["dropout_mode"])
                except Exception:  # as a lone sweep job's failure (cnnlab.train): logged, NaN, the sweep goes on
                    log.exception("stacked job of seeds %s failed; its MLflow runs are marked FAILED and the "
                                  "sweep goes on", [job.seed for job in jobs])
                    scores = [math.nan] * len(chunk)
            for index, score in zip(chunk, scores):
                returns[index].return_value = score
        configure_log(launcher.config.hydra.hydra_logging, launcher.config.hydra.verbose)
    return returns
