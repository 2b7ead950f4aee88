"""Logged runs -> a grouped table with seed statistics, comparisons, warnings and plots.

Per variant (cnnlab.results.runs): n, mean, standard deviation (n - 1) and the Student-t 95%
interval of the mean of each compared metric, over one value per seed (the latest finished run
of that seed), beside parameters, MACs, receptive field and seconds per epoch. Every variant is
compared with the reference (or every pair, with all_pairs) by cnnlab.results.stats.compare_two:
the paired t interval of the mean difference and its p-value, Holm-adjusted over the
comparisons of one call, and the effect sizes and checks that go with it. Which statistics are
shown is decided there, once; this module only lays them out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cnnlab.errors import ConfigError
from cnnlab.results.runs import (
    LoadedRuns,
    grid_order,
    knob_value,
    load_runs,
    natural_key,
    parse_value,
    replicates,
    variant_keys,
)
from cnnlab.results.stats import FIGURE_LABELS, PairResult, adjust, clip_unit, compare_two, mean_ci
from cnnlab.vocabulary import COMPARED_METRICS, DEFAULT_COMPARED

# The planned effect of `--effect`: what "seeds needed" plans for (accuracy, 1 point).
DEFAULT_EFFECT = 0.01
SMALL_N = 3
# Variants that train the same network but for these model keys, which the layer list does not show.
NETWORK_KEYS = ("model.init", "model.bn_momentum", "model.bn_eps")


@dataclass
class Comparison:
    """What `compare` returns: `table` (one row per variant, raw numbers), `pairs` (one
    cnnlab.results.stats.PairResult per comparison), `warnings`, and the runs behind them."""

    runs: pd.DataFrame                 # one row per run: run_id, status, seed, variant, metrics, param:*
    table: pd.DataFrame                # one row per variant, in `order`
    knobs: list[str]
    metric: str = DEFAULT_COMPARED
    order: list[str] = field(default_factory=list)   # variants, the reference first
    reference: str | None = None
    pairs: list[PairResult] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    used_runs: set[str] = field(default_factory=set)  # the runs whose values the statistics use
    decisions: dict[str, str] = field(default_factory=dict)  # cnnlab ablate's, variant -> decision
    error_rate: str = ""

    def pairs_text(self) -> list[str]:
        """One line per comparison: every figure stats decided to show, then its notes."""
        lines = []
        for pair in self.pairs:
            figures = "; ".join(f"{label}: {text}" for label, text in pair.figures())
            notes = "".join(f" ({note})" for note in pair.notes)
            lines.append(f"{pair.title()} on {self.metric}: {figures}{notes}")
        return lines

    def comparisons_table(self) -> pd.DataFrame:
        """One row per comparison, one column per figure (FIGURE_LABELS order); for md, tex, html."""
        rows = []
        for pair in self.pairs:
            shown = dict(pair.figures())
            rows.append({"comparison": pair.title(), **{label: shown.get(label, "") for label in FIGURE_LABELS}})
        table = pd.DataFrame(rows)
        return table.loc[:, (table != "").any(axis=0)] if len(table) else table

    def display(self) -> pd.DataFrame:
        """The table as a reader wants it: mean +- std and the 95% CI per metric, clipped to [0, 1]."""
        t = self.table
        out = pd.DataFrame({"variant": t["variant"], "n": t["n"], "failed": t["failed"]})
        for m in COMPARED_METRICS:
            differs = t[f"{m} n"] != t["n"]
            out[f"{m} mean +- std"] = [f"{_num(a)} +- {_num(b)}" + (f" (n={k})" if d else "")
                                       for a, b, k, d in zip(t[f"{m} mean"], t[f"{m} std"], t[f"{m} n"], differs)]
            out[f"{m} 95% CI"] = [_interval(a, b) for a, b in zip(t[f"{m} ci95 low"], t[f"{m} ci95 high"])]
        for column in ("params", "MACs", "RF"):
            out[column] = [f"{int(v):,}" if not math.isnan(v) else "--" for v in t[column]]
        out["s/epoch"] = [_num(v, 2) for v in t["s/epoch"]]
        return out

    def decision_lines(self) -> list[str]:
        """cnnlab ablate's decisions, with the error rate they hold at."""
        if not self.decisions:
            return []
        shown = "; ".join(f"{variant}: {decision}" for variant, decision in self.decisions.items())
        return [f"decisions (cnnlab ablate, against {self.reference}): {shown}; {self.error_rate}"]

    def lines(self) -> list[str]:
        return [*self.decision_lines(), *self.pairs_text(), *self.notes, *(f"warning: {w}" for w in self.warnings)]

    def text(self) -> str:
        with pd.option_context("display.width", 250, "display.max_columns", 50, "display.max_colwidth", 80):
            body = self.display().to_string(index=False)
        return "\n".join([body, *self.lines()])

    def markdown(self) -> str:
        parts = [_md(self.display())]
        if self.pairs:
            parts += ["", _md(self.comparisons_table())]
        notes = [f"- {line}" for line in self.lines()]
        return "\n".join(parts + ([""] + notes if notes else [])) + "\n"

    def latex(self) -> str:
        """booktabs tables for papers: the variants, then the comparisons."""
        tables = [self.display()] + ([self.comparisons_table()] if self.pairs else [])
        out = []
        for table in tables:
            table = table.copy()
            table.columns = [_tex(c) for c in table.columns]
            for column in table.columns:
                table[column] = table[column].astype(str).map(_tex)
            out.append(table.to_latex(index=False, escape=False))
        return "\n".join(out)

    def csv(self) -> str:
        return self.table.to_csv(index=False)

    def pairs_csv(self) -> str:
        return pd.DataFrame([pair.as_dict() for pair in self.pairs]).to_csv(index=False)


def _num(value: float, digits: int = 4) -> str:
    return "--" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _interval(low: float, high: float) -> str:
    if math.isnan(low):
        return "--"
    low, high, clipped = clip_unit(low, high)
    return f"[{low:.4f}, {high:.4f}]" + ("*" if clipped else "")


def _md(table: pd.DataFrame) -> str:
    cols = list(table.columns)
    rows = ["| " + " | ".join(str(c) for c in cols) + " |", "|" + "---|" * len(cols)]
    rows += ["| " + " | ".join(str(row[c]).replace("|", "\\|") for c in cols) + " |" for _, row in table.iterrows()]
    return "\n".join(rows)


def _tex(text: str) -> str:
    return (str(text).replace("\\", "\\textbackslash{}").replace("+-", "$\\pm$").replace("%", "\\%")
            .replace("_", "\\_").replace("&", "\\&").replace("#", "\\#"))


def _guard_commas(spec: str) -> str:
    """`kernels=[3,3], bn=true`: commas inside brackets become ';' so the spec splits at the others."""
    depth, out = 0, []
    for ch in spec:
        depth += 1 if ch in "[(" else -1 if ch in "])" else 0
        out.append(";" if ch == "," and depth > 0 else ch)
    return "".join(out)


def matches(knob_values: dict[str, str], spec: str) -> bool:
    """Does a variant (its knob values) match `kernels=[5]`, or `model.kernels=[3,3], bn=true`?
    Keys may leave out `model.`; values compare as values ('[3,3]' equals '[3, 3]')."""
    parts = [p.strip() for p in _guard_commas(spec).split(",") if p.strip()]
    if not parts or not all("=" in p for p in parts):
        return False
    for part in parts:
        key, _, value = part.replace(";", ",").partition("=")
        found = knob_values.get(key.strip(), knob_values.get(f"model.{key.strip()}"))
        if found is None or parse_value(found) != parse_value(value.strip()):
            return False
    return True


def is_run_id(text: str) -> bool:
    return len(text) == 32 and all(c in "0123456789abcdef" for c in text)


def target(name_or_run_id: str) -> dict[str, str | None]:
    """compare's (and report's) `experiment` and `parent` for what a user names: a sweep's parent
    run id (32 hex digits), else an experiment's name."""
    run = is_run_id(name_or_run_id)
    return {"parent": name_or_run_id if run else None, "experiment": None if run else name_or_run_id}


def compare(uri: str, experiment: str | None = None, parent: str | None = None, metric: str | None = None,
            *, reference: str | None = None, all_pairs: bool = False, effect: float = DEFAULT_EFFECT,
            include_checks: bool = False) -> Comparison:
    """Compare the variants of an experiment (by name) or of one sweep (its parent run id).

    `metric`: one of COMPARED_METRICS; by default test/acc when every run held out a
    validation split (data.validation=split), else val/acc_best with a warning that it was
    selected on the test set. `reference`: the variant every other is compared with (e.g.
    'kernels=[5]'); by default the preset's control (ablation.control), else the first variant
    in the sweep's own order. `include_checks`: also count runs made by reproduce and audit.
    """
    if metric is not None and metric not in COMPARED_METRICS:
        raise ConfigError(f"metric must be one of {', '.join(COMPARED_METRICS)}, got {metric!r}")
    if not (isinstance(effect, (int, float)) and math.isfinite(effect) and effect > 0):
        raise ConfigError(f"--effect must be a number > 0 (the difference to plan seeds for), got {effect!r}")
    loaded = load_runs(uri, experiment, parent, include_checks)
    runs = loaded.runs
    knobs = variant_keys(runs)
    variant_knobs = {}
    labels = []
    for _, row in runs.iterrows():
        values = {k: knob_value(row, k) for k in knobs}
        label = ", ".join(f"{k.removeprefix('model.')}={v}" for k, v in values.items()) or "all"
        variant_knobs[label] = values
        labels.append(label)
    runs["variant"] = labels
    order = _order(variant_knobs, knobs, loaded)
    split = _validated_on_split(runs)
    metric = metric or ("test/acc" if split else DEFAULT_COMPARED)
    values, duplicate_notes = replicates(runs, metric)
    result = Comparison(runs, pd.DataFrame(), knobs, metric, order)
    result.used_runs = _used_runs(runs, metric)
    result.decisions, result.error_rate = loaded.decisions, loaded.error_rate
    result.table = _table(runs, order)
    result.table.insert(1, "n", result.table[f"{metric} n"])
    result.reference = _reference(order, values, variant_knobs, reference, loaded.control, result.warnings)
    result.pairs = _pairs(order, values, result.reference, all_pairs, effect)
    adjust(result.pairs)
    result.warnings += duplicate_notes + _warnings(result, loaded, variant_knobs, split)
    if result.reference and result.pairs:
        result.notes.insert(0, f"reference variant: {result.reference}; differences are variant - reference"
                            if not all_pairs else "all pairs compared; Holm's correction over all of them")
    if loaded.checks_left_out:
        result.notes.append(f"{loaded.checks_left_out} run(s) made by `cnnlab reproduce` or `cnnlab audit` are "
                            f"left out (they check other runs; include_checks=True counts them)")
    if any(_interval(a, b).endswith("*") for a, b in zip(result.table[f"{metric} ci95 low"],
                                                        result.table[f"{metric} ci95 high"])):
        result.notes.append("* an accuracy interval reaching past [0, 1] is shown clipped to it")
    return result


def _order(variant_knobs: dict[str, dict[str, str]], knobs: list[str], loaded: LoadedRuns) -> list[str]:
    """Variants in the sweep's own order of each knob's values, then naturally ([8] before [16])."""
    grids = {k: grid_order(loaded.grid, k) for k in knobs}

    def key(label: str) -> tuple:
        parts = []
        for k in knobs:
            value = variant_knobs[label][k]
            grid = grids[k]
            parts.append((grid.index(value) if value in grid else len(grid), natural_key(parse_value(value))))
        return tuple(parts)

    return sorted(variant_knobs, key=key)


def _validated_on_split(runs: pd.DataFrame) -> bool:
    column = "param:data.validation"
    return column in runs and bool(len(runs)) and (runs[column] == "split").all()


def _used_runs(runs: pd.DataFrame, metric: str) -> set[str]:
    done = runs[(runs["status"] == "FINISHED") & runs[metric].notna()].sort_values("start")
    return set(done.groupby(["variant", "seed"], sort=False)["run_id"].last())


def _table(runs: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    rows = []
    for variant in order:
        group = runs[runs["variant"] == variant]
        row: dict = {"variant": variant, "failed": int((group["status"] == "FAILED").sum())}
        for m in COMPARED_METRICS:
            per_seed = replicates(group, m)[0].get(variant, {})
            v = np.array(list(per_seed.values()), dtype=float)
            low, high = mean_ci(v) if len(v) else (math.nan, math.nan)
            row.update({f"{m} n": len(v), f"{m} mean": float(v.mean()) if len(v) else math.nan,
                        f"{m} std": float(v.std(ddof=1)) if len(v) > 1 else math.nan,
                        f"{m} ci95 low": low, f"{m} ci95 high": high})
        # Architecture from any run that logged it: a run that failed early may not have.
        for label, key in (("params", "model.total_params"), ("MACs", "model.macs"), ("RF", "model.receptive_field")):
            column = f"param:{key}"
            known = [v for v in (group[column] if column in group else []) if isinstance(v, str) and v.isdigit()]
            row[label] = int(known[0]) if known else math.nan
        done = group[group["status"] == "FINISHED"]
        row["s/epoch"] = float(done["time/epoch_s"].mean()) if len(done) else math.nan
        rows.append(row)
    table = pd.DataFrame(rows)
    return table


def _reference(order: list[str], values: dict, variant_knobs: dict, asked: str | None, control: str | None,
               warnings: list[str]) -> str | None:
    """The variant others are compared with: asked for, else the preset's control, else the first in
    order; never one without a single finished value."""
    usable = [v for v in order if values.get(v)]
    if asked:
        found = [v for v in order if matches(variant_knobs[v], asked)]
        if not found:
            raise ConfigError(f"--reference {asked!r} matches no variant; variants: {'; '.join(order)}")
        if not values.get(found[0]):
            raise ConfigError(f"--reference {asked!r} is variant {found[0]}, which has no finished run with a "
                              f"value to compare; choose one of: {'; '.join(usable) or '(none)'}")
        return found[0]
    if control:
        found = [v for v in order if matches(variant_knobs[v], control)]
        if found and values.get(found[0]):
            return found[0]
        if found:
            warnings.append(f"the preset's control {found[0]} has no finished run; the reference is "
                            f"{usable[0] if usable else 'none'} instead")
    if order and usable and usable[0] != order[0]:
        warnings.append(f"{order[0]} has no finished run with a value, so it cannot be the reference; "
                        f"the reference is {usable[0]}")
    return usable[0] if usable else None


def _pairs(order: list[str], values: dict, reference: str | None, all_pairs: bool, effect: float) -> list[PairResult]:
    if reference is None or len(order) < 2:
        return []
    if all_pairs:
        chosen = [(a, b) for i, a in enumerate(order) for b in order[i + 1:]]
    else:
        chosen = [(reference, other) for other in order if other != reference]
    return [compare_two(values.get(a, {}), values.get(b, {}), effect=effect, a_label=a, b_label=b)
            for a, b in chosen]


def _warnings(result: Comparison, loaded: LoadedRuns, variant_knobs: dict, split: bool) -> list[str]:
    warnings = []
    runs, table, metric = result.runs, result.table, result.metric
    for _, row in table.iterrows():
        variant = row["variant"]
        if row["failed"]:
            group = runs[(runs["variant"] == variant) & (runs["status"] == "FAILED")]
            errors = sorted(set(group["error"]))
            warnings.append(f"{variant}: {row['failed']} run(s) FAILED: {'; '.join(errors)[:300]}")
        n = row[f"{metric} n"]
        if n < SMALL_N:
            warnings.append(f"{variant}: n = {n} seeds (< {SMALL_N}) with a value of {metric}; its interval "
                            f"is not trustworthy")
    # A knob is controlled when an override set it, or set its whole group (model=vgg).
    extra = [k for k in result.knobs if k not in loaded.swept and k.split(".")[0] not in loaded.swept]
    if extra and loaded.swept:
        warnings.append(f"variants also differ in {', '.join(extra)}, which no override set (overrides: "
                        f"{', '.join(loaded.swept)}); the comparison is not controlled")
    warnings += _same_network(runs, result.knobs, variant_knobs)
    if metric.startswith("val/") and not split:
        warnings.append(f"{metric} was selected on the test set (data.validation=test: the best epoch is chosen "
                        f"on the data it is scored on), which biases it upward, and differently per variant; "
                        f"hold out a split (data.validation=split) and compare test/acc")
    return warnings


def _same_network(runs: pd.DataFrame, knobs: list[str], variant_knobs: dict) -> list[str]:
    """Variants that train the same thing: the same layer list and init/BN settings, and the same
    values of every knob outside the model."""
    column = "param:model.layers_expanded"
    if column not in runs or not any(k.startswith("model.") for k in knobs):
        return []
    signature: dict[tuple, list[str]] = {}
    for variant, group in runs.dropna(subset=[column]).groupby("variant", sort=False):
        row = group.iloc[0]
        others = tuple((k, v) for k, v in variant_knobs[variant].items() if not k.startswith("model."))
        network = tuple(row.get(f"param:{k}") for k in NETWORK_KEYS)
        signature.setdefault((row[column], network, others), []).append(variant)
    return [f"variants {', '.join(v)} build the same network ({layers})"
            for (layers, _, _), v in signature.items() if len(v) > 1]


def write_outputs(result: Comparison, folder: Path, uri: str | None = None) -> None:
    """compare.txt/.md/.csv/.tex and comparisons.csv (and the plots when a store URI is given)."""
    from cnnlab.results.plots import plot

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "compare.txt").write_text(result.text() + "\n")
    (folder / "compare.md").write_text(result.markdown())
    (folder / "compare.csv").write_text(result.csv())
    (folder / "comparisons.csv").write_text(result.pairs_csv())
    (folder / "compare.tex").write_text(result.latex())
    if uri:
        plot(result, uri, folder)
