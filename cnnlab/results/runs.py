"""Logged runs -> one table of replicates: which runs belong to the comparison, which variant
each is, and one value per (variant, seed).

A variant is the set of runs that share every knob that varies (cnnlab.vocabulary.is_knob),
the seed excepted. Runs made by `cnnlab reproduce` and `cnnlab audit` are checks of other
runs, not replicates, and are left out unless asked for.
"""

from __future__ import annotations

import ast
import json
import math
from dataclasses import dataclass, field

import pandas as pd

from cnnlab.errors import ConfigError
from cnnlab.tracking.reader import Reader
from cnnlab.vocabulary import ALL_METRICS, CHECK_TAGS, EPOCH_TIME, is_knob


@dataclass
class LoadedRuns:
    runs: pd.DataFrame                      # one row per run: run_id, status, seed, start, metrics, param:*, knob:*
    swept: list[str] = field(default_factory=list)     # keys set by overrides (sweep or single runs)
    grid: dict[str, str] = field(default_factory=dict)  # a sweep's grid, key -> "a,b,c", in its own order
    control: str | None = None              # the variant the experiment's preset declares as its control
    checks_left_out: int = 0
    decisions: dict[str, str] = field(default_factory=dict)  # from `cnnlab ablate`: variant -> decision
    error_rate: str = ""                    # the error rate those decisions hold at, in words


def _set_keys(tags: dict) -> set[str]:
    """Keys a run's overrides set: knob.* tags (sweep jobs) or its `overrides` tag (single runs)."""
    keys = {k[len("knob."):] for k in tags if k.startswith("knob.")}
    for override in tags.get("overrides", "").split():
        keys.add(override.lstrip("+~").partition("=")[0])
    return keys


def load_runs(uri: str, experiment: str | None = None, parent: str | None = None,
              include_checks: bool = False) -> LoadedRuns:
    """Child runs of a sweep parent, or every non-parent run of an experiment."""
    reader = Reader(uri)
    loaded = LoadedRuns(pd.DataFrame())
    if parent:
        parent_run = reader.run(parent)
        runs = reader.children(parent_run)
        loaded.swept = [k for k in parent_run.data.tags.get("sweep.keys", "").split(",") if k]
        loaded.grid = {k[len("sweep.grid."):]: v for k, v in parent_run.data.params.items()
                       if k.startswith("sweep.grid.")}
        parents = [parent_run]
    else:
        runs = [r for r in reader.search([reader.experiment_id(experiment)]) if r.data.tags.get("sweep") != "parent"]
        parents = [r for r in reader.search([reader.experiment_id(experiment)], "tags.sweep = 'parent'")]
        parents = sorted(parents, key=lambda r: r.info.start_time)
        for p in parents:  # the newest sweep's order wins
            loaded.grid.update({k[len("sweep.grid."):]: v for k, v in p.data.params.items()
                                if k.startswith("sweep.grid.")})
    ablations = [p for p in parents if "ablation.decisions" in p.data.tags]
    if ablations:  # the newest ablation's decisions (cnnlab ablate)
        loaded.decisions = json.loads(ablations[-1].data.tags["ablation.decisions"])
        loaded.error_rate = ablations[-1].data.tags.get("ablation.error_rate", "")
    checks = [r for r in runs if any(t in r.data.tags for t in CHECK_TAGS)]
    if not include_checks:
        runs = [r for r in runs if r not in checks]
        loaded.checks_left_out = len(checks)
    if not runs:
        where = f"parent run {parent}" if parent else f"experiment {experiment}"
        raise ConfigError(f"no runs to compare in {where}")
    rows, swept = [], set(loaded.swept)
    for run in runs:
        params, tags = run.data.params, run.data.tags
        seed = params.get("seed", tags.get("seed"))
        row = {"run_id": run.info.run_id, "status": run.info.status, "start": run.info.start_time or 0,
               "seed": int(seed) if isinstance(seed, str) and seed.lstrip("-").isdigit() else seed,
               "error": tags.get("error", "")}
        row.update({f"param:{k}": v for k, v in params.items()})
        row.update({m: run.data.metrics.get(m, math.nan) for m in (*ALL_METRICS, EPOCH_TIME)})
        row.update({f"knob:{k[5:]}": v for k, v in tags.items() if k.startswith("knob.")})
        rows.append(row)
        swept |= _set_keys(tags)
        loaded.control = loaded.control or params.get("ablation.control") or None
    loaded.runs = pd.DataFrame(rows)
    loaded.swept = sorted(swept)
    return loaded


def variant_keys(runs: pd.DataFrame) -> list[str]:
    """Knobs whose value differs between runs (params, and failed runs' override tags)."""
    keys = []
    for column in runs.columns:
        if column.startswith(("param:", "knob:")) and is_knob(column.split(":", 1)[1]):
            key = column.split(":", 1)[1]
            if runs[column].dropna().map(normal_text).nunique() > 1 and key not in keys:
                keys.append(key)
    return sorted(keys)


def knob_value(row: pd.Series, key: str) -> str:
    for column in (f"param:{key}", f"knob:{key}"):
        if column in row and isinstance(row[column], str):
            return normal_text(row[column])
    return "?"


def parse_value(text: str) -> object:
    """A knob's logged text as a value: '[3, 3]' -> (3, 3), '0.5' -> 0.5, 'max' -> 'max'."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        low = text.strip().lower()
        return {"true": True, "false": False}.get(low, text.strip())
    return tuple(value) if isinstance(value, list) else value


def normal_text(text: str) -> str:
    """One spelling per value: an override's '[3,3]' and a param's '[3, 3]' are the same knob value."""
    value = parse_value(text)
    return str(list(value)) if isinstance(value, tuple) else str(text).strip()


def natural_key(value: object) -> tuple:
    """Numbers and lists of numbers in numeric order ([8] before [16], [3,3] before [3,3,3]); text after."""
    if isinstance(value, bool):
        return (1, int(value))
    if isinstance(value, (int, float)):
        return (0, (value,))
    if isinstance(value, tuple) and all(isinstance(v, (int, float)) for v in value):
        return (0, value)
    return (2, str(value))


def grid_order(grid: dict[str, str], key: str) -> list[str]:
    """A sweep's values of one key, in the order the sweep listed them."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if key not in grid:
        return []
    (override,) = OverridesParser.create().parse_overrides([f"{key}={grid[key]}"])
    values = list(override.sweep_string_iterator()) if override.is_sweep_override() else [grid[key]]
    return [normal_text(v) for v in values]


def replicates(runs: pd.DataFrame, metric: str) -> tuple[dict[str, dict[object, float]], list[str]]:
    """variant -> {seed: value}: per (variant, seed) the latest FINISHED run with a finite value of
    `metric`; and one note per variant that had duplicate seeds (re-runs of the same seed)."""
    done = runs[(runs["status"] == "FINISHED") & runs[metric].notna()].sort_values("start")
    out: dict[str, dict[object, float]] = {}
    notes = []
    for variant, group in done.groupby("variant", sort=False):
        counts = group["seed"].value_counts()
        repeated = sorted(str(s) for s, c in counts.items() if c > 1)
        if repeated:
            notes.append(f"{variant}: seed(s) {', '.join(repeated)} ran more than once; the latest finished "
                         f"run of each seed is used")
        out[variant] = {seed: float(value) for seed, value in zip(group["seed"], group[metric])}  # latest wins
    return out, notes
