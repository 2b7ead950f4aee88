"""Composing the Hydra config outside `@hydra.main`, and turning it into a model plan.

`cnnlab summary` and the tests compose exactly the config `cnnlab train`
composes, so every override means the same thing everywhere.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


# --------------------------------------------------------------------------- whole-config checks

GROUPS = ("model", "data", "optim", "trainer", "tracking")
# What cnnlab.module logs every epoch: the only keys ModelCheckpoint can follow.
MONITORS = ("val/loss", "val/acc", "val/acc_best", "train/loss", "train/acc")


def _union(schema: dict, tree: Mapping) -> dict:
    """Merge a YAML mapping's key tree into `schema` (a leaf is None, a mapping a dict)."""
    for key, value in tree.items():
        if isinstance(value, Mapping):
            schema[key] = _union(schema.get(key) or {}, value)
        else:
            schema.setdefault(key, None)
    return schema


@functools.lru_cache(maxsize=4)
def known_keys(conf_dir: Path = CONF_DIR) -> dict:
    """Every key the shipped configs define: train.yaml's, and per group the union over its
    options (so a key added to a YAML file is known without touching this code)."""
    top = OmegaConf.to_container(OmegaConf.load(conf_dir / "train.yaml"), resolve=False)
    schema = _union({}, {k: v for k, v in top.items() if k not in ("defaults", "hydra")})
    for group in GROUPS:
        merged: dict = {}
        for path in sorted((conf_dir / group).glob("*.yaml")):
            tree = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
            _union(merged, {k: v for k, v in tree.items() if k != "defaults"})
        schema[group] = merged
    return schema


def _check_keys(cfg: Mapping, schema: Mapping, where: str) -> None:
    for key, value in cfg.items():
        if key not in schema:
            place = f"in {where.rstrip('.')}" if where else "at the top level"
            raise ConfigError(f"unknown key '{where}{key}'; allowed {place}: "
                              f"{', '.join(sorted(str(k) for k in schema))}")
        if isinstance(value, Mapping) and isinstance(schema[key], Mapping):
            _check_keys(value, schema[key], f"{where}{key}.")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _flag(value: Any, key: str) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")


def _text(value: Any, key: str, nullable: bool = False, hint: str = "") -> None:
    if value is None and nullable:
        return
    if not isinstance(value, str) or not value.strip():
        allowed = "null or a non-empty string" if nullable else "a non-empty string"
        raise ConfigError(f"{key} must be {allowed}{hint}, got {value!r}")


def check_run_config(cfg: Mapping[str, Any]) -> None:
    """The keys outside the groups' own checks (resolved config): unknown or missing keys,
    checkpoint, paths, ckpt_path, and the tracking values tracking.check_tracking_config leaves
    alone. Touches no files."""
    schema = known_keys()
    missing = [key for key in schema if key not in cfg]
    if missing:
        raise ConfigError(f"the config has no {', '.join(missing)}; a run needs all of "
                          f"{', '.join(schema)} (was a group removed with ~?)")
    for key, node in schema.items():
        if isinstance(node, Mapping) and not isinstance(cfg[key], Mapping):
            raise ConfigError(f"{key} must be a mapping of its own keys ({', '.join(node)}), "
                              f"got {cfg[key]!r}")
    # family.model_tokens checks the model's keys: it tells a family from a layer list.
    _check_keys({k: v for k, v in cfg.items() if k != "model"}, schema, "")
    checkpoint, tracking = cfg["checkpoint"], cfg["tracking"]
    if checkpoint.get("monitor") not in MONITORS:
        raise ConfigError(f"checkpoint.monitor must be one of {', '.join(MONITORS)} (the metrics "
                          f"logged every epoch), got {checkpoint.get('monitor')!r}")
    if checkpoint.get("mode") not in ("min", "max"):
        raise ConfigError(f"checkpoint.mode must be min or max, got {checkpoint.get('mode')!r}")
    _flag(checkpoint.get("save_last"), "checkpoint.save_last")
    for key in ("enabled", "log_model", "step_metrics"):
        _flag(tracking.get(key), f"tracking.{key}")
    if tracking.get("uri") != "":  # an empty MLFLOW_TRACKING_URI means unset, as null does
        _text(tracking.get("uri"), "tracking.uri", nullable=True,
              hint=" (sqlite:///PATH, http://HOST:PORT, a database URI)")
    _text(tracking.get("experiment"), "tracking.experiment")
    _text(tracking.get("run_name"), "tracking.run_name", nullable=True)
    step_every = tracking.get("step_every")
    if not _is_int(step_every) or step_every < 1:
        raise ConfigError(f"tracking.step_every must be an integer >= 1 (steps), got {step_every!r}")
    timeout = tracking.get("timeout_s")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < float("inf"):
        raise ConfigError(f"tracking.timeout_s must be a number of seconds > 0, got {timeout!r}")
    for key in schema["paths"]:
        _text(cfg["paths"].get(key), f"paths.{key}", hint=" (a folder)")
    _text(cfg["ckpt_path"], "ckpt_path", nullable=True, hint=" (a .ckpt file to resume from)")


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


def check_checkpoint(path: Path, plan: ModelPlan, model: Mapping[str, Any]) -> None:
    """ckpt_path must be a Lightning checkpoint of this very network: a garbage file or another
    model's checkpoint would otherwise fail inside Lightning, after the MLflow run exists."""
    import torch

    from cnnlab.build import build

    if not path.is_file():
        raise ConfigError(f"ckpt_path={path} does not exist or is not a file; give a .ckpt written "
                          f"by cnnlab train (runs/outputs/.../checkpoints/last.ckpt) or null")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises RuntimeError, UnpicklingError, EOFError ... here
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"ckpt_path={path} is not a readable checkpoint ({reason[:200]}); give a "
                          f".ckpt written by cnnlab train") from None
    if not (isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping)
            and "epoch" in state):
        raise ConfigError(f"ckpt_path={path} is not a Lightning checkpoint (no state_dict and "
                          f"epoch); give a .ckpt written by cnnlab train")
    network = build(plan.analysis, model.get("init", "keras"), model.get("bn_momentum", 0.99),
                    model.get("bn_eps", 1e-3), logits=True)
    expected = {f"network.{k}": tuple(v.shape) for k, v in network.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state["state_dict"].items()
             if k.startswith("network.") and hasattr(v, "shape")}
    if found != expected:
        differs = sorted(k for k in expected.keys() | found.keys() if expected.get(k) != found.get(k))
        # A tensor both have, in another shape, says more than one the other network lacks.
        key = min(differs, key=lambda k: (k not in expected or k not in found, k))
        raise ConfigError(f"ckpt_path={path} holds another network: {key} is "
                          f"{list(found[key]) if key in found else 'missing'} there but "
                          f"{list(expected[key]) if key in expected else 'absent'} in "
                          f"model {plan.name} ({len(differs)} tensor(s) differ); resume with "
                          f"the model config it was trained with")


def error_text(error: BaseException) -> str:
    """One line for a bad-input error: ConfigError's own, Hydra's and OmegaConf's multi-line
    messages folded, with the allowed values named where Hydra knows them."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    def fold(text: str) -> str:
        return "; ".join(line.strip() for line in str(text).strip().splitlines() if line.strip())

    if isinstance(error, OverrideParseException):
        return f"cannot parse the override '{error.override}': {fold(error.message)}"
    if isinstance(error, MissingConfigException) and error.options:
        group = str(error.missing_cfg_file).rpartition("/")[0]
        return (f"Could not find '{error.missing_cfg_file}'; available options in '{group}': "
                f"{', '.join(error.options)}")
    cause = error.__cause__
    if isinstance(cause, OmegaConfBaseException) and str(error).startswith("Could not override"):
        full_key = str(cause.full_key or "")
        parent = cause.parent_node
        if full_key and isinstance(parent, Mapping) and "not in struct" in str(cause):
            group, _, leaf = full_key.rpartition(".")
            where = f"{group} has no key '{leaf}'" if group else f"there is no top-level key '{leaf}'"
            keys = sorted(str(k) for k in parent.keys() if k != "hydra")  # Hydra's own, not cnnlab's
            return f"Could not override '{full_key}': {where}; allowed: {', '.join(keys)}"
    if isinstance(error, OmegaConfBaseException) and str(error).strip():
        # OmegaConf appends "full_key: ..." and "object_type=..." lines; name the key once.
        where = f" (at {error.full_key})" if getattr(error, "full_key", None) else ""
        return f"{str(error).strip().splitlines()[0]}{where}"
    return fold(str(error))
