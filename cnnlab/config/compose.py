"""Composing the Hydra config outside `@hydra.main`, and what identifies a composed config.

`cnnlab summary` and the tests compose exactly the config `cnnlab train`
composes, so every override means the same thing everywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cnnlab.vocabulary import is_trained

# conf/ sits beside the package in the repository (installed editable).
CONF_DIR = Path(os.environ.get("CNNLAB_CONF", Path(__file__).resolve().parents[2] / "conf"))


def slug(text: object, max_len: int = 120) -> str:
    """A safe single path segment: no separators, no leading dots, bounded length, and one per text.

    Run directories are named by experiment and overrides; this keeps names such as `../../etc` or
    `/abs/path` inside the runs root. A text the replacement changed (or cut) gets a short hash of
    itself appended, so two texts never share a folder: `a/b` -> `a_b-<8 hex>`, while `a_b` stays
    `a_b` (once both were `a_b`, and two experiments shared their run directories).
    """
    text = str(text)
    clean = re.sub(r"[^A-Za-z0-9._=,+-]", "_", text).lstrip(".")
    if clean == text and 0 < len(clean) <= max_len:
        return clean
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{(clean or 'default')[:max_len - len(digest) - 1]}-{digest}"


OmegaConf.register_new_resolver("cnnlab_slug", slug, replace=True)


def _user_cache() -> str:
    from cnnlab.data.sources import user_cache_dir

    return str(user_cache_dir())


OmegaConf.register_new_resolver("cnnlab_user_cache", _user_cache, replace=True)


def compose(overrides: list[str] | None = None, config_name: str = "train",
            with_hydra: bool = False) -> DictConfig:
    """The composed (unresolved) config for these command-line overrides; `with_hydra` keeps
    Hydra's own node (`hydra.run.dir`, `hydra.overrides.task` ...), as a Hydra app's job sees it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides or []),
                             return_hydra_config=with_hydra)


def container(node: Any) -> dict:
    """A config node as plain, resolved Python data."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'model': {'bn': True}} -> {'model.bn': True}; lists stay whole values."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def config_hash(cfg: DictConfig) -> str:
    """16 hex digits identifying what a config trains (the same hash = the same experiment)."""
    kept = {k: v for k, v in flatten(container(cfg)).items() if is_trained(k)}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]
