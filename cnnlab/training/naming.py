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


def run_directory(cfg: DictConfig, name: str) -> Path:
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(cfg.paths.runs) / "outputs" / slug(cfg.tracking.experiment) / slug(name)


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
