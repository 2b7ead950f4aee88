"""One schema per config group: every field's type, range and meaning, and the checks that
come from it.

A small declarative table rather than Hydra structured configs (dataclasses): OmegaConf's
own type errors are multi-line and name Python types ("Value 'x' could not be converted to
Integer"), while every check here prints one line that names the key, the allowed values and
the value given (`trainer.max_epochs must be an integer >= 1, got 0`). The YAML files stay
the documentation of defaults; a test checks that every YAML key has a field here and back.

Rules that tie two fields together (a family's widths per block, standardize's mean per
channel) live beside the table, as the group's `rules`. Nothing here imports torch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from cnnlab.errors import ConfigError
from cnnlab.vocabulary import MONITORS

# ------------------------------------------------------------------------------ field kinds


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


@dataclass(frozen=True)
class Field:
    """A value's check: `allowed` says in words what `accepts` lets through."""

    accepts: Callable[[Any], bool]
    allowed: str
    doc: str = ""
    nullable: bool = False

    def check(self, key: str, value: Any) -> None:
        if value is None and self.nullable:
            return
        if not self.accepts(value):
            allowed = f"null or {self.allowed}" if self.nullable and "null" not in self.allowed else self.allowed
            raise ConfigError(f"{key} must be {allowed}, got {value!r}")


def Int(minimum: int, doc: str = "", nullable: bool = False, unit: str = "") -> Field:  # noqa: N802
    return Field(lambda v: _is_int(v) and v >= minimum,
                 f"an integer >= {minimum}{f' ({unit})' if unit else ''}", doc, nullable)


def Number(low: float, high: float = math.inf, *, low_open: bool = False, high_open: bool = True,  # noqa: N802
           doc: str = "", unit: str = "", hint: str = "", nullable: bool = False) -> Field:
    def accepts(v: Any) -> bool:
        return (_is_number(v) and not math.isinf(v) and (v > low if low_open else v >= low)
                and (v < high if high_open else v <= high))

    if unit:  # "a number of seconds > 0"
        text = f"a number of {unit} {'>' if low_open else '>='} {low:g}"
    else:  # an open end at infinity reads "(0, inf)", and says that inf itself is refused
        finite = "finite " if math.isinf(high) else ""
        text = (f"a {finite}number in {'(' if low_open else '['}{low:g}, {high:g}"
                f"{')' if high_open or math.isinf(high) else ']'}")
    return Field(accepts, text + hint, doc, nullable)


def Choice(values: tuple, doc: str = "", nullable: bool = False) -> Field:  # noqa: N802
    shown = ("null", *values) if nullable else values
    return Field(lambda v: v in values, f"one of {', '.join(str(v) for v in shown)}", doc, nullable)


def Flag(doc: str = "", nullable: bool = False, hint: str = "") -> Field:  # noqa: N802
    return Field(lambda v: isinstance(v, bool),
                 f"{'null' + hint + ', ' if nullable else ''}true or false", doc, nullable)


def Text(doc: str = "", nullable: bool = False, hint: str = "") -> Field:  # noqa: N802
    return Field(lambda v: isinstance(v, str) and bool(v.strip()),
                 f"{'null or ' if nullable else ''}a non-empty string{hint}", doc, nullable)


def Name(max_len: int, doc: str = "", nullable: bool = False) -> Field:  # noqa: N802
    """A name people read in MLflow and in logs: no control characters (a newline would split a log
    line in two, an ANSI escape would reach the terminal), at most `max_len` characters."""
    def accepts(v: Any) -> bool:
        return (isinstance(v, str) and bool(v.strip()) and len(v) <= max_len
                and not any(ord(c) < 32 or 127 <= ord(c) < 160 for c in v))

    return Field(accepts, f"{'null or ' if nullable else ''}a non-empty string of at most {max_len} "
                          f"characters without control characters", doc, nullable)


def _path_like(v: str) -> bool:
    """'/abs', '~/x', '../x', 'a/../b', '..': a name that reads as a path out of somewhere."""
    return v.startswith(("/", "~", "\\")) or any(part in (".", "..") for part in re.split(r"[/\\]", v))


def RunName(max_len: int, doc: str = "", nullable: bool = False) -> Field:  # noqa: N802
    """An experiment or run name: a Name, and not a path (folders are made safe from names, but MLflow
    would keep '../x' or '/tmp/x' as the name itself, and people would read it as a place)."""
    name = Name(max_len, doc, nullable)
    return Field(lambda v: name.accepts(v) and not _path_like(v),
                 f"{name.allowed.removeprefix('null or ')}, not a path (no leading '/' or '~', no '.' or "
                 "'..' between slashes; 'team/study' is fine)", doc, nullable)


def Path(doc: str = "") -> Field:  # noqa: N802
    return Field(lambda v: isinstance(v, str), "a path or null", doc, nullable=True)


def IntList(doc: str = "", allow_empty: bool = False, scalar_ok: bool = False) -> Field:  # noqa: N802
    def accepts(v: Any) -> bool:
        if scalar_ok and _is_int(v):
            v = [v]
        return isinstance(v, (list, tuple)) and (allow_empty or bool(v)) and all(_is_int(x) and x >= 1 for x in v)

    return Field(accepts, "a list of positive integers", doc)


def Shape(doc: str = "") -> Field:  # noqa: N802
    return Field(lambda v: isinstance(v, (list, tuple)) and len(v) == 3 and all(_is_int(d) and d >= 1 for d in v),
                 "[channels, height, width] of positive integers", doc)


def Betas(doc: str = "") -> Field:  # noqa: N802
    def accepts(v: Any) -> bool:
        return isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_number(b) and 0 <= b < 1 for b in v)

    return Field(accepts, "two numbers in [0, 1)", doc)


def Custom(accepts: Callable[[Any], bool], allowed: str, doc: str = "") -> Field:  # noqa: N802
    return Field(accepts, allowed, doc)


@dataclass(frozen=True)
class Group:
    """A config group's fields (every key it may hold) and its cross-field rules."""

    name: str
    fields: Mapping[str, Field | Group]
    rules: tuple[Callable[[Mapping[str, Any]], None], ...] = ()
    optional: frozenset[str] = field(default_factory=frozenset)  # keys only some options define

    def check(self, cfg: Any, where: str | None = None) -> None:
        """Unknown keys, missing keys, every field, then the rules: the first problem raises."""
        where = self.name if where is None else where
        if not isinstance(cfg, Mapping):
            raise ConfigError(f"{where} must be a mapping of its own keys ({', '.join(self.fields)}), got {cfg!r}")
        unknown = [k for k in cfg if k not in self.fields]
        if unknown:
            raise ConfigError(f"unknown key '{where}.{unknown[0]}'; allowed in {where}: "
                              f"{', '.join(sorted(self.fields))}")
        missing = [k for k in self.fields if k not in cfg and k not in self.optional]
        if missing:
            raise ConfigError(f"{where}.{missing[0]} is missing; {where} needs all of "
                              f"{', '.join(k for k in self.fields if k not in self.optional)}")
        for key, spec in self.fields.items():
            if key in cfg and isinstance(spec, Group):
                spec.check(cfg[key], f"{where}.{key}")
            elif key in cfg:
                spec.check(f"{where}.{key}", cfg[key])
        for rule in self.rules:
            rule(cfg)


# ------------------------------------------------------------------------------ the groups

ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
PRECISIONS = ("32", "32-true", "64", "64-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true")
GRADIENT_CLIP_ALGORITHMS = ("norm", "value")
STRATEGY_EXAMPLES = ("auto", "ddp", "ddp_spawn", "ddp_fork", "fsdp", "deepspeed", "single_device")


def _devices_ok(devices: Any) -> bool:
    """Lightning's forms: auto, a count, -1 for all, a list of indices, or '0,1'."""
    if devices == "auto" or devices == -1:
        return True
    if isinstance(devices, str):
        parts = devices.split(",")
        if len(parts) == 1:  # '2' is a count, as 2 is
            return parts[0].strip().isdigit() and int(parts[0]) >= 1
        return all(p.strip().isdigit() for p in parts if p.strip()) and any(p.strip() for p in parts)
    if _is_int(devices):
        return devices >= 1
    return (isinstance(devices, list) and bool(devices) and len(set(devices)) == len(devices)
            and all(_is_int(d) and d >= 0 for d in devices))


def _strategy_ok(strategy: Any) -> bool:
    if strategy == "auto":
        return True  # no Lightning import for the common case
    from lightning.pytorch.strategies import StrategyRegistry

    return isinstance(strategy, str) and strategy.lower() in StrategyRegistry.available_strategies()


def _batch_limit_ok(value: Any) -> bool:
    return _is_number(value) and value > 0 and not (isinstance(value, float) and value > 1)


_BATCH_LIMIT = "null, a batch count >= 1 or a fraction in (0, 1]"

TRAINER = Group("trainer", {
    "max_epochs": Int(1, "epochs to train; a longer run of the same command continues it"),
    "accelerator": Choice(ACCELERATORS, "where to train"),
    "devices": Custom(_devices_ok, "auto, a count >= 1, -1 (all), or device indices such as [0, 1] or '0,1'"),
    "strategy": Custom(_strategy_ok, f"one of {', '.join(STRATEGY_EXAMPLES)} or another name in Lightning's "
                                     f"StrategyRegistry"),
    "num_nodes": Int(1, "machines in a multi-node DDP job"),
    "sync_batchnorm": Flag("BatchNorm statistics over all ranks' batches"),
    "precision": Custom(lambda v: str(v) in PRECISIONS, f"one of {', '.join(PRECISIONS)}"),
    "deterministic": Custom(lambda v: isinstance(v, bool) or v == "warn", "true, false or warn",
                            "deterministic algorithms"),
    "limit_train_batches": Field(_batch_limit_ok, _BATCH_LIMIT, nullable=True),
    "limit_val_batches": Field(_batch_limit_ok, _BATCH_LIMIT, nullable=True),
    "limit_test_batches": Field(_batch_limit_ok, _BATCH_LIMIT, nullable=True),
    "gradient_clip_val": Field(lambda v: _is_number(v) and 0 <= v < math.inf, "null or a finite number >= 0",
                               nullable=True),
    "gradient_clip_algorithm": Choice(GRADIENT_CLIP_ALGORITHMS, "norm: scale the gradients' total norm down to "
                                      "gradient_clip_val | value: clamp each gradient to +-gradient_clip_val"),
    "accumulate_grad_batches": Int(1, "batches whose gradients are summed before each optimizer step"),
    "enable_progress_bar": Flag(nullable=True, hint=" (a bar on a terminal)"),
    "max_macs": Number(1, doc="refuse a network of more multiply-accumulates per image"),
    "threads": Int(1, "torch CPU threads; null: split the cores between parallel jobs", nullable=True),
    "compile": Choice(COMPILE_MODES, "torch.compile mode", nullable=True),
    "benchmark": Flag("cudnn.benchmark", nullable=True),
    "channels_last": Flag("NHWC memory layout"),
})

OPTIMIZERS = ("adam", "adamw", "sgd")
# torch's three implementations of the same update: a Python loop over the tensors, one
# multi-tensor (foreach) kernel per operation, or one fused kernel for the whole step.
OPTIMIZER_IMPLEMENTATIONS = ("loop", "foreach", "fused")
SCHEDULES = ("none", "step", "cosine", "onecycle")


def _nesterov_needs_momentum(cfg: Mapping[str, Any]) -> None:
    if cfg["nesterov"] and cfg["name"] == "sgd" and cfg["momentum"] == 0:
        raise ConfigError("optim.nesterov=true needs optim.momentum > 0")


OPTIM = Group("optim", {
    "name": Choice(OPTIMIZERS),
    "lr": Number(0.0, low_open=True),
    "betas": Betas(),
    "eps": Number(0.0, low_open=True),
    "weight_decay": Number(0.0),
    "momentum": Number(0.0, 1.0, high_open=False),
    "nesterov": Flag(),
    "schedule": Choice(SCHEDULES),
    "step_size": Int(1, unit="epochs"),
    "gamma": Number(0.0, 1.0, low_open=True, high_open=False),
    "label_smoothing": Number(0.0, 0.999, high_open=False),
    "impl": Choice(OPTIMIZER_IMPLEMENTATIONS),
}, rules=(_nesterov_needs_momentum,))

DATA_NAMES = ("synthetic", "cifar10", "mnist", "fashion_mnist", "folder")
VALIDATIONS = ("test", "split")
NORMALIZATIONS = ("scale", "standardize")
PIPELINES = ("memory", "loader")
SYNTHETIC_ONLY = frozenset({"n_train", "n_test", "noise"})


def _data_rules(cfg: Mapping[str, Any]) -> None:
    name, shape = cfg["name"], cfg["shape"]
    present = sorted(SYNTHETIC_ONLY & set(cfg))
    if name == "synthetic" and len(present) < len(SYNTHETIC_ONLY):
        raise ConfigError(f"data=synthetic needs {', '.join(sorted(SYNTHETIC_ONLY))}")
    # mean/std are read only by `standardize`; checking them under `scale` would make
    # data.shape=[1,...] overrides fail on an unused 3-channel default.
    if cfg["normalize"] == "standardize":
        for key in ("mean", "std"):
            values = cfg[key]
            if (not isinstance(values, (list, tuple)) or len(values) != shape[0]
                    or not all(_is_number(v) for v in values)):
                raise ConfigError(f"data.{key} must be {shape[0]} numbers, one per channel of "
                                  f"data.shape={list(shape)} (normalize=standardize), got {values!r}")
        if not all(v > 0 for v in cfg["std"]):
            raise ConfigError(f"data.std must be numbers > 0, got {cfg['std']!r}")
    if name == "folder" and cfg["archive"] is None and cfg["root"] is None:
        raise ConfigError("data=folder needs data.root=DIR (with train/ and test/) or data.archive=FILE.tar.gz")
    if name not in ("folder", "synthetic") and cfg["root"] is None:
        raise ConfigError(f"data.root is null; data={name} needs a folder to look in and download to")
    if name == "synthetic":
        # Synthetic data's size is in the config: what loading would find, found now.
        from cnnlab.data.sources import check_split, check_subset

        source = f"synthetic data (data.n_train={cfg['n_train']})"
        check_subset(cfg["subset"], cfg["n_train"], source)
        if cfg["validation"] == "split":
            check_split(cfg["subset"] or cfg["n_train"], cfg["val_fraction"], source)


DATA = Group("data", {
    "name": Choice(DATA_NAMES, "which dataset"),
    "root": Path("where datasets are looked for and downloaded to"),
    "archive": Path("an image-tree .tar.gz"),
    "download": Flag("try torchvision's download when no local copy is found"),
    "shape": Shape("(channels, height, width) the model sees"),
    "num_classes": Int(2),
    "batch_size": Int(1),
    "eval_batch_size": Int(1),
    "validation": Choice(VALIDATIONS, "test: validate on the test set (the chapter); split: hold out val_fraction"),
    "val_fraction": Number(0.0, 1.0, low_open=True),
    "subset": Int(1, "only the first N training images", nullable=True),
    "normalize": Choice(NORMALIZATIONS),
    "mean": Field(lambda v: isinstance(v, (list, tuple)), "a list of numbers, one per channel"),
    "std": Field(lambda v: isinstance(v, (list, tuple)), "a list of numbers, one per channel"),
    "augment": Group("data.augment", {"crop_padding": Int(0), "hflip": Flag()}),
    "pipeline": Choice(PIPELINES),
    "num_workers": Int(0),
    "n_train": Int(1),
    "n_test": Int(1),
    "noise": Number(0.0),
}, rules=(_data_rules,), optional=SYNTHETIC_ONLY)

SERVER_SCHEMES = ("http", "https")
DATABASE_SCHEMES = ("postgresql", "mysql", "mssql")  # SQLAlchemy dialects MLflow's SQL store runs on


def _tracking_uri_form(cfg: Mapping[str, Any]) -> None:
    """The URI's form, before anything opens it: each of these was a traceback from MLflow or
    SQLAlchemy after the job had started, or (an in-memory store) a run that kept nothing."""
    import os

    uri = cfg["uri"]
    if not uri or not cfg["enabled"]:
        return
    uri = str(uri)
    scheme = urlparse(uri).scheme.lower()
    use = "use sqlite:///PATH/mlflow.db, http://HOST:PORT, or null (the store under paths.runs)"
    if scheme == "sqlite":
        path = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else None
        if path is None or not path.strip():
            raise ConfigError(f"tracking.uri={uri!r} is not a SQLite file URI; write sqlite:///relative/path.db "
                              f"or sqlite:////absolute/path.db")
        if path.strip() == ":memory:" or path.startswith("file::memory:") or "mode=memory" in path:
            raise ConfigError(f"tracking.uri={uri!r} is an in-memory store: it would keep nothing once the job "
                              f"ends; {use}")
    elif uri.lower().startswith(("databricks", "uc:")):
        raise ConfigError(f"tracking.uri={uri!r}: cnnlab does not support Databricks tracking (it needs "
                          f"Databricks credentials and workspace paths cnnlab does not set up); {use}")
    elif scheme in ("file", ""):  # a folder
        if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() != "true":
            raise ConfigError(f"tracking.uri={uri!r} is a folder (MLflow's file store, which MLflow 3 refuses "
                              f"unless MLFLOW_ALLOW_FILE_STORE=true); {use}")
    elif scheme in SERVER_SCHEMES:
        if not urlparse(uri).hostname:
            raise ConfigError(f"tracking.uri={uri!r} names no host; write http://HOST:PORT")
    elif scheme.split("+")[0] not in DATABASE_SCHEMES:
        raise ConfigError(f"tracking.uri scheme '{scheme}' is not one MLflow serves; use "
                          f"sqlite:///PATH, http://HOST:PORT or a database URI "
                          f"({', '.join(f'{s}://...' for s in DATABASE_SCHEMES)})")


def _server_needs_uri(cfg: Mapping[str, Any]) -> None:
    if not cfg["enabled"] or not cfg["require_server"]:
        return
    uri = cfg["uri"]
    if not uri:
        raise ConfigError("tracking=server needs the server's address: set tracking.uri=http://HOST:PORT "
                          "or the MLFLOW_TRACKING_URI environment variable")
    if urlparse(str(uri)).scheme not in SERVER_SCHEMES:
        raise ConfigError(f"tracking=server needs an http:// or https:// URI, got {uri!r} (from tracking.uri "
                          f"or MLFLOW_TRACKING_URI); for a local store use tracking=mlflow")


TRACKING = Group("tracking", {
    "enabled": Flag("track in MLflow"),
    # An empty MLFLOW_TRACKING_URI means unset, as null does.
    "uri": Field(lambda v: v == "" or (isinstance(v, str) and bool(v.strip())),
                 "null or a non-empty string (sqlite:///PATH, http://HOST:PORT, a database URI)", nullable=True),
    "experiment": RunName(500, "the MLflow experiment (MLflow keeps names of at most 500 characters)"),
    "run_name": RunName(500, nullable=True),
    "log_model": Flag("the final model: MLflow's pytorch flavour and the pyfunc classifier"),
    "step_metrics": Flag("also log train/loss every step_every steps"),
    "step_every": Int(1, unit="steps"),
    "timeout_s": Number(0.0, low_open=True, unit="seconds"),
    "outage_wait_s": Number(0.0, unit="seconds"),
    "require_server": Flag("refuse the embedded store"),
    "parent": Text("a run id whose children a multirun's jobs become (cnnlab ablate)", nullable=True),
    "weights_txt": Field(lambda v: v == "auto" or isinstance(v, bool), "auto, true or false",
                         "weights.txt: auto = only for the chapter's baseline model"),
    "system_metrics": Flag("MLflow's system metrics monitor (psutil, a dependency of cnnlab)"),
}, rules=(_server_needs_uri, _tracking_uri_form))

CHECKPOINT = Group("checkpoint", {
    "monitor": Choice(MONITORS, "the metric the best checkpoint follows (logged every epoch)"),
    "mode": Choice(("min", "max")),
    "save_last": Flag("last.ckpt after every epoch, which a rerun resumes from"),
    "test": Choice(("last", "best"), "which weights test/* scores: the last epoch's or the best checkpoint's"),
})

EARLY_STOPPING = Group("early_stopping", {
    "patience": Int(1, "epochs without improvement of monitor before training stops; null: off", nullable=True,
                    unit="epochs"),
    "monitor": Choice(MONITORS, "the metric followed (logged every epoch)"),
    "mode": Choice(("min", "max")),
    "min_delta": Number(0.0, doc="the least change that counts as an improvement"),
})

ABLATION = Group("ablation", {
    "question": Text("the question an experiment preset asks", nullable=True),
    "control": Text("the reference variant, e.g. kernels=[5]", nullable=True),
})

RUN = Group("run", {
    "fresh": Flag("a new run beside the one this command trained before"),
    "resume": Choice(("auto", "force"), "auto: refuse to continue a run into changed code | force: continue it"),
})

PATHS = Group("paths", {key: Text(hint=" (a folder)") for key in ("runs", "data", "cache")})

INITS = ("keras", "torch")  # cnnlab.model.build's initialisations
MODEL_COMMON = {
    "name": Text("the model's name in run names"),
    "init": Choice(INITS, "keras: Glorot-uniform kernels, zero biases | torch: PyTorch's defaults"),
    "bn_momentum": Number(0.0, 1.0, hint=" (Keras's convention: the fraction of the old moving statistic kept)"),
    "bn_eps": Number(0.0, low_open=True),
}

# The top level of train.yaml, groups included.
TOP = {"seed": Field(lambda v: _is_int(v) and 0 <= v < 2**32, "an integer in [0, 2**32)"),
       "ckpt_path": Text(nullable=True, hint=" (a .ckpt file to resume from)"),
       # Seeds trained together as one stacked network, each its own child run (cnnlab.training.stacked_run).
       "seeds": Field(lambda v: isinstance(v, list) and len(v) >= 1 and len(set(v)) == len(v)
                      and all(_is_int(s) and 0 <= s < 2**32 for s in v),
                      "a list of distinct integers in [0, 2**32), e.g. [0,1,2,3]", nullable=True)}
GROUPS = {group.name: group for group in (TRAINER, OPTIM, DATA, TRACKING, CHECKPOINT, EARLY_STOPPING, PATHS,
                                                ABLATION, RUN)}


def check_config(cfg: Mapping[str, Any]) -> None:
    """The whole resolved config except the model (cnnlab.model.family checks that, as it expands
    it): unknown and missing keys, every field, every rule. Touches no files."""
    allowed = {*TOP, *GROUPS, "model", "hydra"}
    unknown = sorted(k for k in cfg if k not in allowed)
    if unknown:
        raise ConfigError(f"unknown key '{unknown[0]}'; allowed at the top level: "
                          f"{', '.join(sorted(allowed - {'hydra'}))}")
    missing = [k for k in (*TOP, *GROUPS, "model") if k not in cfg]
    if missing:
        raise ConfigError(f"the config has no {', '.join(missing)}; a run needs all of "
                          f"{', '.join((*TOP, *GROUPS, 'model'))} (was a group removed with ~?)")
    for key, spec in TOP.items():
        spec.check(key, cfg[key])
    for name, group in GROUPS.items():
        group.check(cfg[name])


# ------------------------------------------------------------------------------ the model group

POOLS = ("max", "avg", "none")
HEADS = ("flatten", "gap")


def _widths_per_block(cfg: Mapping[str, Any]) -> None:
    widths = cfg["widths"] if isinstance(cfg["widths"], (list, tuple)) else [cfg["widths"]]
    if len(widths) not in (1, cfg["blocks"]):
        raise ConfigError(f"model.widths has {len(widths)} entries for {cfg['blocks']} blocks; give one "
                          f"width for all blocks or one per block")


def _model_groups() -> tuple[Group, Group]:
    from cnnlab.model.spec import ACTIVATIONS, PADDINGS

    family = Group("model", {
        **MODEL_COMMON,
        "blocks": Int(1, "conv blocks, each: kernels -> pool -> dropout"),
        "widths": IntList("filters per block: one for all blocks, or one per block", scalar_ok=True),
        "kernels": Field(lambda v: not isinstance(v, (list, tuple)) or bool(v),
                         "a list of at least one kernel, e.g. [5] or [3,3]", "the conv stack of a block"),
        "padding": Choice(PADDINGS, "Keras semantics"),
        "bn": Flag("BatchNorm after each conv, before its activation"),
        "activation": Choice(ACTIVATIONS),
        "pool": Choice(POOLS),
        "pool_size": Int(1, "pool window; its stride equals its size, as in Keras"),
        "pool_padding": Choice(PADDINGS),
        "dropout": Number(0.0, 1.0, doc="after each block and each hidden dense layer; 0 = none"),
        "head": Choice(HEADS),
        "dense": IntList("hidden dense widths before the output layer", allow_empty=True, scalar_ok=True),
    }, rules=(_widths_per_block,))
    layers = Group("model", {**MODEL_COMMON, "layers": Field(
        lambda v: isinstance(v, (list, tuple)),
        "a list of tokens such as [conv:6:5:same, relu, flatten, dense:10]")})
    return family, layers


MODEL_FAMILY, MODEL_LAYERS = _model_groups()

# ------------------------------------------------------------------------------ the resnet group

# He et al. 2016, section 4.2 (CIFAR-10): option A pads the identity with zeros where the shape
# changes (the paper's CIFAR models), B projects there (1x1 conv + BN), C projects everywhere.
SHORTCUT_OPTIONS = ("A", "B", "C")
PAPER_DEPTHS = (20, 32, 44, 56, 110, 1202)  # 6n + 2 with n = 3, 5, 7, 9, 18, 200


def _resnet_rules(cfg: Mapping[str, Any]) -> None:
    depth, blocks, stages = cfg["depth"], cfg["blocks"], len(cfg["widths"])
    if (depth is None) == (blocks is None):
        raise ConfigError(f"model.depth={depth} and model.blocks={blocks}: set exactly one (the depth, or the "
                          f"blocks per stage, e.g. model.blocks=[2,2,2] model.depth=null)")
    if blocks is not None and len(blocks) != stages:
        raise ConfigError(f"model.blocks must be one block count per stage ({stages} stages, one per width in "
                          f"model.widths={list(cfg['widths'])}), got {list(blocks)}")
    if depth is not None and (depth < 2 + 2 * stages or (depth - 2) % (2 * stages)):
        per_block = 2 * stages
        examples = ", ".join(str(2 + per_block * n) for n in (1, 2, 3, 5, 9))
        paper = f"; He et al. 2016 uses {', '.join(map(str, PAPER_DEPTHS))}" if stages == 3 else ""
        raise ConfigError(f"model.depth must be 2 + {per_block}n: a stem conv, {stages} stages of n blocks of 2 "
                          f"convs, and the classifier ({examples} ...{paper}), got {depth}")


MODEL_RESNET = Group("model", {
    **MODEL_COMMON,
    "depth": Field(lambda v: _is_int(v) and v >= 2, "null or an integer >= 2 (2 + 6n for 3 stages)",
                   "weighted layers: the stem, 2 convs per block, the classifier", nullable=True),
    "blocks": Field(lambda v: isinstance(v, (list, tuple)) and bool(v) and all(_is_int(b) and b >= 1 for b in v),
                    "a list of positive integers, one per stage", "blocks per stage, instead of depth",
                    nullable=True),
    "widths": IntList("channels per stage; the stem has the first; later stages start with stride 2"),
    "bn": Flag("BatchNorm after every conv (off: the convs get biases)"),
    "stem_kernel": Int(1, "the stem conv's kernel (3 in the paper)"),
    "dropout": Number(0.0, 1.0, doc="before the classifier; 0 = none"),
    "shortcut": Choice(SHORTCUT_OPTIONS, "A: zero-pad identity | B: projection where the shape changes | "
                       "C: projection everywhere"),
}, rules=(_resnet_rules,))

# ------------------------------------------------------------------------------ opaque modules
# Networks given as modules (cnnlab.model.modules): the name-level checks are here; the arch, the
# weights and the registered name are checked against torchvision and the registry when planned.

MODEL_TORCHVISION = Group("model", {
    "name": Text("the model's name in run names"),
    "arch": Text("a torchvision classification model: torchvision.models.list_models(module=torchvision.models)"),
    "num_classes": Int(2, "the classifier's outputs; must equal data.num_classes (it follows it by default)"),
    "weights": Text("null (random init) or a weights name: DEFAULT, IMAGENET1K_V1, ResNet18_Weights.IMAGENET1K_V1 "
                    "(from the local torch hub cache only)", nullable=True),
    "cifar_stem": Flag("3x3 stride-1 stem conv and no max pool (torchvision's ResNet archs)"),
})

MODEL_REGISTERED = Group("model", {
    "name": Text("the registered name (cnnlab.register_model or an entry point in group cnnlab.models)",
                 nullable=True),
    "args": Field(lambda v: isinstance(v, Mapping) and all(isinstance(k, str) for k in v),
                  "null or a mapping of keyword arguments, e.g. {width:32,depth:3}", "keyword arguments to the factory",
                  nullable=True),
})
