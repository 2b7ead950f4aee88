"""Composing the Hydra config outside `@hydra.main`, and turning it into a model plan.

`cnnlab summary` and the tests compose exactly the config `cnnlab train`
composes, so every override means the same thing everywhere.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from cnnlab.analysis import Analysis, analyse, check_classifier
from cnnlab.errors import ConfigError
from cnnlab.family import model_specs
from cnnlab.spec import LayerSpec, to_token

# conf/ sits beside the package in the repository (installed editable).
CONF_DIR = Path(os.environ.get("CNNLAB_CONF", Path(__file__).resolve().parent.parent / "conf"))


def slug(text: object, max_len: int = 120) -> str:
    """A safe single path segment: no separators, no leading dots, bounded length.

    Run directories are named by experiment and overrides; this keeps names
    such as `../../etc` or `/abs/path` inside the runs root.
    """
    clean = re.sub(r"[^A-Za-z0-9._=,+-]", "_", str(text)).lstrip(".")
    if len(clean) > max_len:
        digest = hashlib.sha256(clean.encode()).hexdigest()[:12]
        clean = f"{clean[:max_len - 13]}-{digest}"
    return clean or "default"


OmegaConf.register_new_resolver("cnnlab_slug", slug, replace=True)

# Keys that say where things live or how a run is shown, not what is trained.
NOT_HASHED = ("paths.", "tracking.", "ckpt_path", "trainer.enable_progress_bar", "trainer.threads",
              "data.root", "data.archive", "data.download", "hydra")


def config_hash(cfg: DictConfig) -> str:
    """16 hex digits identifying what a config trains (the same hash = the same experiment)."""
    import json

    from cnnlab.tracking import flatten

    flat = flatten(OmegaConf.to_container(cfg, resolve=True))
    kept = {k: v for k, v in flat.items() if not k.startswith(NOT_HASHED)}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def compose(overrides: list[str] | None = None, config_name: str = "train") -> DictConfig:
    """The composed (unresolved) config for these command-line overrides."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides or []),
                             return_hydra_config=False)


@dataclass(frozen=True)
class ModelPlan:
    """Everything known about the network before a tensor exists."""

    name: str
    specs: list[LayerSpec]
    analysis: Analysis

    @property
    def tokens(self) -> list[str]:
        return [to_token(spec) for spec in self.specs]


def _container(node) -> dict:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)


def model_plan(cfg: DictConfig) -> ModelPlan:
    """Parse, expand and analyse the model for the data's input shape; fail fast."""
    model, data = _container(cfg.model), _container(cfg.data)
    shape, classes = data.get("shape"), data.get("num_classes")
    if not (isinstance(shape, list) and len(shape) == 3
            and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
        raise ConfigError(f"data.shape must be [channels, height, width] of positive integers, "
                          f"got {shape!r}")
    if isinstance(classes, bool) or not isinstance(classes, int) or classes < 2:
        raise ConfigError(f"data.num_classes must be an integer >= 2, got {classes!r}")
    specs = model_specs(model, classes)
    analysis = analyse(specs, tuple(shape))
    check_classifier(analysis, classes)
    return ModelPlan(str(model.get("name", "model")), specs, analysis)
