"""Reproducibility audit: train one configuration twice on CPU, deterministically, and diff the runs.

On CPU with `trainer.deterministic=true` and the same seed, two runs should
agree bit for bit: the same per-epoch metrics (history.jsonl) and the same
weights (checkpoints/last.ckpt). Any difference points at a source of
nondeterminism (threads, an algorithm, unseeded randomness) that would also
blur a comparison between variants.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import torch

from cnnlab.errors import ConfigError
from cnnlab.training.artifacts import read_history
from cnnlab.vocabulary import AUDIT_TAG

# Set by the audit itself; overriding them would make it audit something else.
OWNED = ("trainer.accelerator", "trainer.deterministic", "tracking.log_model", "tracking.run_name", "paths.runs")
# A small budget by default (the baseline's 5 CIFAR-10 epochs twice would take minutes);
# placed before the user's overrides, so theirs win.
BUDGET = ["trainer.max_epochs=2", "trainer.limit_train_batches=20", "trainer.limit_val_batches=5",
          "trainer.limit_test_batches=5"]
RUN_NAMES = ("audit-a", "audit-b")
# history.jsonl columns that are not results: the row's key and its wall-clock time.
NOT_METRICS = ("epoch", "seconds")


def audit(overrides: list[str], runs: Path) -> dict:
    """Train the composed config twice under `runs/audit/`; the largest metric and weight differences."""
    from omegaconf import OmegaConf

    from cnnlab.config.compose import compose
    from cnnlab.training.naming import run_directory
    from cnnlab.training.run import train

    for override in overrides:
        key = override.lstrip("+~").partition("=")[0]
        if key in OWNED:
            raise ConfigError(f"audit sets {key} itself; remove the override '{override}' "
                              f"(audit-owned keys: {', '.join(OWNED)})")
    user = compose([*BUDGET, *overrides])
    # A fresh folder per audit: an earlier run directory would be resumed (or skipped as
    # complete) instead of trained, and the audit would compare nothing.
    root = Path(runs).resolve() / "audit"
    root.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=root))
    # paths.data defaults to ${paths.runs}/data: pin it (and paths.cache) to where the user's
    # config finds its data, or moving paths.runs would hide the dataset.
    forced = ["trainer.accelerator=cpu", "trainer.deterministic=true", "tracking.log_model=false",
              f"paths.runs={_quoted(folder)}", f"paths.data={_quoted(Path(user.paths.data).resolve())}",
              f"paths.cache={_quoted(Path(user.paths.cache).resolve())}"]

    directories = []
    for name in RUN_NAMES:
        cfg = compose([*BUDGET, *overrides, *forced, f"tracking.run_name={name}"])
        # Tagged: an audit run is a check, not a replicate (compare leaves it out). train() puts
        # the process's deterministic-algorithms flag back afterwards.
        train(cfg, tags={AUDIT_TAG: name})
        directories.append(run_directory(cfg, name))
    settings = {"trainer.deterministic": bool(cfg.trainer.deterministic),
                "torch_threads": torch.get_num_threads(), "seed": int(cfg.seed),
                # Lightning's deterministic=true means torch.use_deterministic_algorithms(True)
                # while training.
                "deterministic_algorithms": bool(cfg.trainer.deterministic)}
    if directories[0] == directories[1]:  # e.g. inside a Hydra app, whose output dir wins
        raise ConfigError(f"both audit runs wrote to {directories[0]}; run the audit outside a Hydra job")
    a, b = directories
    metrics = history_difference(a / "history.jsonl", b / "history.jsonl")
    weights = weight_difference(checkpoint_weights(a / "checkpoints" / "last.ckpt"),
                                checkpoint_weights(b / "checkpoints" / "last.ckpt"))
    return {"overrides": list(overrides), "trainer": OmegaConf.to_container(cfg.trainer, resolve=True),
            "folder": str(folder), "runs": [str(a), str(b)], "determinism": settings,
            "metrics": metrics, "weights": weights, "verdict": verdict(metrics, weights)}


def _quoted(path: Path) -> str:
    """A path as a Hydra override value: quoted, since '=', ',' or brackets in it would not parse."""
    return "'" + str(path).replace("\\", "\\\\").replace("'", "\\'") + "'"


def verdict(metrics: Mapping, weights: Mapping) -> str:
    """'identical' only when nothing differs at all: bitwise repeatability, not a tolerance."""
    same = (metrics["max_abs_diff"] == 0.0 and weights["max_abs_diff"] == 0.0
            and metrics["problem"] is None and weights["problem"] is None)
    return "identical" if same else "differs"


def _abs_diff(x: float | None, y: float | None) -> float:
    if x is None or y is None:
        return 0.0 if x is y else math.inf
    if math.isnan(x) or math.isnan(y):
        return 0.0 if math.isnan(x) and math.isnan(y) else math.inf
    return abs(x - y)


def history_difference(a: Path, b: Path) -> dict:
    """Largest |a - b| over every metric of every epoch of two history.jsonl files (wall times ignored)."""
    rows_a = {row["epoch"]: row for row in read_history(a)}
    rows_b = {row["epoch"]: row for row in read_history(b)}
    result = {"max_abs_diff": 0.0, "metric": None, "epoch": None, "values": 0, "problem": None}
    if sorted(rows_a) != sorted(rows_b):
        return {**result, "max_abs_diff": math.inf,
                "problem": f"the runs logged different epochs: {sorted(rows_a)} vs {sorted(rows_b)}"}
    if not rows_a:
        return {**result, "problem": "no epochs logged"}
    for epoch in sorted(rows_a):
        keys = sorted((set(rows_a[epoch]) | set(rows_b[epoch])) - set(NOT_METRICS))
        for key in keys:
            diff = _abs_diff(rows_a[epoch].get(key), rows_b[epoch].get(key))
            result["values"] += 1
            if diff > result["max_abs_diff"]:
                result.update(max_abs_diff=diff, metric=key, epoch=epoch)
    return result


def checkpoint_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ConfigError(f"no checkpoint at {path}; set checkpoint.save_last=true for the audit")
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def weight_difference(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> dict:
    """Largest elementwise |a - b| over every tensor of two state dicts (buffers included)."""
    result = {"max_abs_diff": 0.0, "tensor": None, "tensors": 0, "problem": None}
    if set(a) != set(b):
        only = sorted(set(a) ^ set(b))
        return {**result, "max_abs_diff": math.inf, "tensor": only[0],
                "problem": f"the state dicts hold different tensors: {', '.join(only[:5])}"}
    for name in sorted(a):
        x, y = a[name].detach().double(), b[name].detach().double()
        result["tensors"] += 1
        if x.shape != y.shape:
            return {**result, "max_abs_diff": math.inf, "tensor": name,
                    "problem": f"{name} has shape {tuple(x.shape)} vs {tuple(y.shape)}"}
        if x.numel() == 0:
            continue
        diff = (x - y).abs()
        both_nan = torch.isnan(x) & torch.isnan(y)
        diff = torch.where(both_nan, torch.zeros_like(diff), diff.nan_to_num(nan=math.inf))
        largest = float(diff.max())
        if largest > result["max_abs_diff"]:
            result.update(max_abs_diff=largest, tensor=name)
    return result


def audit_text(result: Mapping) -> str:
    """The audit as a few lines for a terminal."""
    s, m, w = result["determinism"], result["metrics"], result["weights"]
    metric_where = f" ({m['metric']}, epoch {m['epoch']})" if m["metric"] else ""
    weight_where = f" ({w['tensor']})" if w["tensor"] else ""
    lines = [
        f"audit: {' '.join(result['overrides']) or '(no overrides)'}: two runs on CPU in {result['folder']}",
        f"determinism: trainer.deterministic={s['trainer.deterministic']}, torch threads {s['torch_threads']}, "
        f"seed {s['seed']}, torch deterministic algorithms "
        f"{'on' if s['deterministic_algorithms'] else 'off'} while training",
        f"metrics (history.jsonl, wall times ignored): max |a - b| = {m['max_abs_diff']:.6g}{metric_where} "
        f"over {m['values']} values",
        f"weights (checkpoints/last.ckpt): max |a - b| = {w['max_abs_diff']:.6g}{weight_where} "
        f"over {w['tensors']} tensors",
    ]
    lines += [f"problem: {p}" for p in (m["problem"], w["problem"]) if p]
    lines.append(f"verdict: {result['verdict']}")
    return "\n".join(lines)
