"""What a run is called and where it lives: its name, its folder, and its place in a sweep."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from cnnlab.config.compose import slug
from cnnlab.vocabulary import in_run_name


def in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def overrides() -> list[str]:
    """This job's command-line overrides (none outside a Hydra app)."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def run_name(cfg: DictConfig, overrides: list[str]) -> str:
    """Readable and unique within a sweep: model, the overrides that matter, seed."""
    if cfg.tracking.run_name:
        return str(cfg.tracking.run_name)
    parts = [str(cfg.model.name)]
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if key in ("seed", "model") or not in_run_name(key):
            continue
        parts.append(f"{key.removeprefix('model.')}={value}")
    parts.append(f"s{cfg.seed}")
    return "-".join(parts)[:250]


DESCRIPTION_TAG = "mlflow.note.content"  # the run's description in MLflow (mlflow_tags.MLFLOW_RUN_NOTE)


def run_description(cfg: DictConfig, name: str, overrides: list[str]) -> str:
    """The run's description in MLflow (the note under its name): the preset's question, then
    this run's variant, i.e. its name and the overrides that make it one."""
    knobs = [o.lstrip("+~") for o in overrides if in_run_name(o.lstrip("+~").partition("=")[0])]
    variant = f"Variant: {name}" + (f" ({', '.join(knobs)})" if knobs else "")
    question = cfg.ablation.question
    return f"{question}\n\n{variant}" if question else variant


def run_directory(cfg: DictConfig, name: str) -> Path:
    """The run's folder: Hydra's output dir in a Hydra app (conf/train.yaml names it, run.fresh
    included), else runs/outputs/<experiment>/<name>. With run.fresh=true each call outside Hydra
    picks a new folder: call it once per run."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    parent = Path(cfg.paths.runs) / "outputs" / slug(cfg.tracking.experiment)
    return parent / fresh_name(slug(name), bool(cfg.run.fresh), parent)


def fresh_name(name: str, fresh: bool, parent: str | Path = "") -> str:
    """`name`, or with run.fresh=true the first of name, name-2, name-3 ... that is not a folder in
    `parent` yet: a new run beside the old one, which stays as it was."""
    if not fresh or not (Path(parent) / name).exists():
        return name
    n = 2
    while (Path(parent) / f"{name}-{n}").exists():
        n += 1
    return f"{name}-{n}"


def sweep_tags(overrides: list[str]) -> dict[str, str]:
    """In a multirun: the parent run, and this job's overrides as knob.* tags."""
    from hydra.core.hydra_config import HydraConfig

    from cnnlab.training.sweep import parent_run_id

    if not in_multirun():
        return {}
    tags = {f"knob.{k.lstrip('+~')}": v for k, _, v in (o.partition("=") for o in overrides)}
    # The job's output dir is <sweep dir>/<subdir>, resolved by the launcher in the
    # launching process; re-resolving sweep.dir in a worker process could differ.
    parent = parent_run_id(Path(HydraConfig.get().runtime.output_dir).parent)
    return {**tags, "mlflow.parentRunId": parent} if parent else tags
