"""Everything `cnnlab train` checks before it does any work, in one pass: the config against
its schema, the model plan, the accelerator, the output folder and the tracking store.

`checked` runs once per config in a process: `cnnlab train`'s preflight (before Hydra writes
anything) and the Hydra job itself compose the same config, and the second check is skipped.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from cnnlab.config.compose import compose, container
from cnnlab.config.schema import check_config
from cnnlab.errors import ConfigError
from cnnlab.model.plan import ModelPlan, model_plan

_CHECKED: dict[str, ModelPlan] = {}  # resolved config (JSON) -> its plan, for this process


def checked(cfg: DictConfig) -> tuple[ModelPlan, dict]:
    """Every check that needs no data: fail in milliseconds, before anything is written.
    Returns the model plan and the resolved data config."""
    # Resolving the whole config once makes a broken ${...} interpolation fail here, and
    # unknown keys (`+trainer.max_epoch=3` would otherwise do nothing) fail by name.
    resolved = container(cfg)
    key = json.dumps({k: v for k, v in resolved.items() if k != "hydra"}, sort_keys=True, default=str)
    if key not in _CHECKED or _registered_again(_CHECKED[key]):
        check_config(resolved)
        check_accelerator(resolved["trainer"])
        check_clipping(resolved["trainer"], resolved["optim"])
        plan = model_plan(cfg)
        from cnnlab.training.budget import check_budget

        check_budget(plan, resolved["data"], resolved["optim"], resolved["trainer"])  # before any allocation
        if cfg.ckpt_path:  # a garbage file or another model's checkpoint would fail inside fit()
            from cnnlab.training.resume import check_checkpoint

            check_checkpoint(Path(cfg.ckpt_path), plan, resolved["model"], resolved["trainer"]["max_epochs"])
        _CHECKED[key] = plan
    return _CHECKED[key], resolved["data"]


def _registered_again(plan: ModelPlan) -> bool:
    """A registered model whose name now stands for another factory (a notebook cell run again after an
    edit): the cached plan would train the old one."""
    if plan.kind != "registered":
        return False
    from cnnlab.model.registry import factory_of

    return factory_of(plan.name) is not plan.module.factory


def check_clipping(trainer: Mapping[str, Any], optim: Mapping[str, Any]) -> None:
    """Lightning refuses to clip gradients under mixed precision when the optimizer unscales them inside
    its own step, as a fused one does (MixedPrecision.clip_gradients raises a RuntimeError at the first
    step, after the MLflow run exists); a stack clips as the lone run, so the same holds for it."""
    clip, precision = trainer["gradient_clip_val"], str(trainer["precision"])
    if clip is not None and clip > 0 and precision in ("16-mixed", "bf16-mixed") and optim["impl"] == "fused":
        raise ConfigError(f"trainer.gradient_clip_val={clip} with trainer.precision={precision} needs "
                          f"optim.impl=foreach or loop: Lightning cannot clip a fused optimizer's gradients "
                          f"under mixed precision (it unscales them inside its step)")


def check_accelerator(trainer: Mapping[str, Any]) -> None:
    """The accelerator asked for is on this machine (Lightning finds out only after the MLflow
    run exists). Imports torch only when a device other than the CPU is asked for."""
    accelerator, devices = trainer["accelerator"], trainer["devices"]
    if accelerator in ("auto", "cpu"):
        return
    import torch

    if accelerator == "tpu":
        from lightning.pytorch.accelerators import XLAAccelerator

        available, count = XLAAccelerator.is_available(), None
    elif accelerator == "mps" or (accelerator == "gpu" and not torch.cuda.is_available()):
        available, count = torch.backends.mps.is_available(), 1
    else:  # gpu, cuda
        available, count = torch.cuda.is_available(), torch.cuda.device_count()
    if not available:
        raise ConfigError(f"trainer.accelerator={accelerator} but this machine has no such device; "
                          f"use trainer.accelerator=auto or cpu")
    wanted = (max(devices) + 1 if isinstance(devices, list) and devices
              else devices if isinstance(devices, int) and devices > 0 else None)
    if count is not None and wanted is not None and wanted > count:
        raise ConfigError(f"trainer.devices={devices!r} asks for more {accelerator} devices than the "
                          f"{count} this machine has; use at most {count}, -1 (all) or auto")


def check_batch_limits(trainer: Mapping[str, Any], data: Mapping[str, Any], n_train: int, n_test: int) -> None:
    """A fraction in trainer.limit_*_batches that leaves no batch of this data: Lightning found that
    out only inside fit(), after the MLflow run existed (MisconfigurationException). Needs the data's
    size, so it runs once the data has loaded, before the run is opened."""
    n_val = round(n_train * data["val_fraction"]) if data["validation"] == "split" else n_test
    if data["validation"] == "split":
        n_train -= n_val
    for stage, images, batch in (("train", n_train, data["batch_size"]), ("val", n_val, data["eval_batch_size"]),
                                 ("test", n_test, data["eval_batch_size"])):
        limit = trainer[f"limit_{stage}_batches"]
        batches = math.ceil(images / batch)
        if isinstance(limit, float) and 0 < limit and int(batches * limit) == 0:
            raise ConfigError(f"trainer.limit_{stage}_batches={limit:g} of the {batches} {stage} batches "
                              f"({images} images, batch size {batch}) is no batch at all; use a fraction of at "
                              f"least {1 / batches:.3g}, or a batch count (an integer >= 1)")


def check_writable(folder: Path, key: str) -> None:
    """Create `folder` and write a small file there: a read-only, misplaced or full output
    folder fails here, in milliseconds, instead of in the middle of a run."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder, prefix=".cnnlab-write-test") as probe:
            probe.write(b"\0" * 65536)  # a few blocks: a full disk refuses them
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as error:
        raise ConfigError(f"{key}={folder} is not a folder cnnlab can write to ({error.strerror}); "
                          f"point {key} at a writable folder with free space") from None


# Hydra's instantiation keys: an override that sets one could make Hydra import and call any
# object (hydra.callbacks are instantiated before cnnlab's code runs). cnnlab chooses objects by
# short names looked up in its own registries, so no command line needs them.
INSTANTIATION_KEYS = ("_target_", "_partial_", "_args_", "_recursive_", "_convert_")
# Hydra settings that run code or shell commands: callbacks (instantiated), logging handlers,
# formatters and filters (logging.config imports and calls their `class` and `()`), submitit's
# `setup` lines (shell commands in the sbatch script) and Ray's runtime_env (environment variables,
# setup hooks, packages to install). They belong in config files under conf/, never on the
# command line.
CODE_KEYS = ("hydra.callbacks", "hydra.launcher.setup", "hydra.launcher.ray.init.runtime_env",
             *(f"hydra.{log}.{part}" for log in ("job_logging", "hydra_logging")
               for part in ("handlers", "formatters", "filters")))
# hydra.job.env_set sets environment variables in the job's process, which every program it starts
# inherits: GIT_CONFIG_* made cnnlab's own `git status` run a command, LD_PRELOAD or PYTHONPATH
# would load code. The command line may set only these, to values of this form.
ENV_SET = "hydra.job.env_set"
SAFE_ENV = {"CUDA_VISIBLE_DEVICES": r"[A-Za-z0-9,-]*",  # GPU indices or UUIDs (GPU-..., MIG-...)
            "OMP_NUM_THREADS": r"[1-9][0-9]{0,3}", "MKL_NUM_THREADS": r"[1-9][0-9]{0,3}"}


def _assignments(arg: str) -> list[tuple[str, object]] | None:
    """Every (dotted key, value) an override sets, a dict value's nested keys included
    (`hydra.job={env_set:{A:1}}` sets hydra.job.env_set.A); None if Hydra cannot parse it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        (override,) = OverridesParser.create().parse_overrides([arg])
    except OverrideParseException:
        return None
    found: list[tuple[str, object]] = []

    def walk(key: str, value: object) -> None:
        found.append((key, value))
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{key}.{k}", v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(key, v)
        elif isinstance(getattr(value, "list", None), list):  # a sweep: choice(...), a,b
            for v in value.list:
                walk(key, v)

    key = override.key_or_group.replace("/", ".")
    walk(f"{key}.{override.package}" if override.package else key, override.value())
    return found


def _under(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith(prefix + ".")


def refuse_object_overrides(argv: list[str]) -> None:
    """No override may make Hydra import or call objects, run commands, or set environment
    variables other than SAFE_ENV's: not by its key, nor by keys inside a dict value."""
    for arg in argv:
        if arg.startswith("-"):
            continue  # Hydra's own flags (-m, --cfg job); their values parse as nothing below
        found = _assignments(arg)
        if found is None:  # unparsable: Hydra refuses it too; judge the text alone
            found = [(arg, None)]
        for key, value in found:
            parts = set(key.lstrip("+~").split("."))
            if parts & set(INSTANTIATION_KEYS) or (value is None and any(k in arg for k in INSTANTIATION_KEYS)):
                raise ConfigError(f"override '{arg}' sets a Hydra instantiation key; cnnlab does not let "
                                  f"the command line import or call objects. Choose by name instead "
                                  f"(optim.name=adam, model=vgg, hydra/launcher=joblib)")
            key = key.lstrip("+~")
            code = next((prefix for prefix in CODE_KEYS if _under(key, prefix)), None)
            if code:
                raise ConfigError(f"override '{arg}' changes {code}, which runs code; cnnlab does not let the "
                                  f"command line do that: put it in a config file under conf/")
            leaf = not isinstance(value, (dict, list, tuple)) and not hasattr(value, "list")
            if _under(key, ENV_SET) and key != ENV_SET and leaf:
                name = key[len(ENV_SET) + 1:]
                pattern = SAFE_ENV.get(name)
                if pattern is None or not re.fullmatch(pattern, str(value)):
                    raise ConfigError(
                        f"override '{arg}' sets the environment variable {name} for the job; the command "
                        f"line may set only {', '.join(sorted(SAFE_ENV))} (thread counts, GPU indices): "
                        f"others (GIT_CONFIG_*, LD_PRELOAD, PYTHONPATH ...) can make programs run code")


def preflight(argv: list[str]) -> None:
    """`cnnlab train`'s checks before Hydra starts. Hydra reports a bad override in several
    lines with status 1, and creates the run folder before train() sees the config; composing
    the same config here turns every bad input into one `error:` line (status 2) with nothing
    written. It also tries the output folder and the tracking store, which train() meets only
    after loading the data. Skipped with Hydra's own flags (-m, --cfg ...: a sweep checks each
    job as it runs it) and for ${hydra:...} values, which resolve only inside Hydra's app."""
    from cnnlab.tracking.store import check_tracking, is_embedded, tracking_uri

    refuse_object_overrides(argv)  # before anything composes them
    from cnnlab.training.stacked_run import refuse_seed_with_seeds

    refuse_seed_with_seeds(argv)  # a sweep over seed with seeds=[...] too: before Hydra starts
    if any(arg.startswith(("-", "hydra.mode")) or "${hydra:" in arg for arg in argv):
        return
    cfg = compose(argv)
    checked(cfg)
    if cfg.seeds is not None:
        from cnnlab.training.stacked_run import check_seeds

        check_seeds(cfg)
    runs = Path(cfg.paths.runs)
    check_writable(runs, "paths.runs")
    uri = tracking_uri(cfg.tracking.uri, runs.resolve())
    # A server or database now; the embedded store's folder was just tried, and train() creates
    # the store itself (only once the data has loaded).
    if cfg.tracking.enabled and not is_embedded(uri):
        check_tracking(uri, cfg.tracking.timeout_s)
