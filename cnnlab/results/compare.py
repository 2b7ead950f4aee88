"""Logged runs -> a grouped table with seed statistics, paired tests, warnings and plots.

Variants are the groups of runs that share every knob that varies, the seed
excepted. For each: n, mean, standard deviation (n - 1) and the 95%
confidence interval of the mean (Student's t) of the best validation
accuracy and the test accuracy, beside parameters, MACs, receptive field and
seconds per epoch. Two variants are compared on the seeds they share: the
mean paired difference, a bootstrap 95% interval of it, and the two-sided
paired t-test's p-value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from cnnlab.errors import ConfigError
from cnnlab.tracking.reader import Reader
from cnnlab.vocabulary import COMPARED_METRICS as METRICS
from cnnlab.vocabulary import DEFAULT_COMPARED, EPOCH_TIME, is_knob

BOOTSTRAP_SAMPLES = 10_000


def ci95(values: np.ndarray) -> tuple[float, float]:
    """Student-t 95% interval of the mean; NaN when n < 2."""
    n = len(values)
    if n < 2:
        return math.nan, math.nan
    mean, sem = float(np.mean(values)), float(np.std(values, ddof=1)) / math.sqrt(n)
    half = float(stats.t.ppf(0.975, n - 1)) * sem
    return mean - half, mean + half


def paired(a: np.ndarray, b: np.ndarray, seed: int = 0) -> dict:
    """b - a over shared seeds: mean, bootstrap 95% CI, paired t-test p-value."""
    diff = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    n = len(diff)
    rng = np.random.default_rng(seed)
    if n >= 2:
        means = rng.choice(diff, size=(BOOTSTRAP_SAMPLES, n), replace=True).mean(axis=1)
        low, high = (float(q) for q in np.percentile(means, [2.5, 97.5]))
        p = float(stats.ttest_rel(b, a).pvalue) if np.std(diff) > 0 else (1.0 if np.all(diff == 0) else 0.0)
    else:
        low = high = p = math.nan
    return {"n": n, "mean_diff": float(np.mean(diff)) if n else math.nan,
            "ci95_low": low, "ci95_high": high, "p_value": p, "test": "paired t-test, two-sided"}


@dataclass
class Comparison:
    runs: pd.DataFrame                 # one row per run: variant, seed, status, metrics, params
    table: pd.DataFrame                # one row per variant
    knobs: list[str]
    pairs: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    metric: str = DEFAULT_COMPARED

    def pairs_text(self) -> list[str]:
        """One sentence per paired comparison, naming the test."""
        lines = []
        for p in self.pairs:
            lines.append(
                f"{p['b']} - {p['a']} on {self.metric} over {p['n']} shared seeds: "
                f"mean {p['mean_diff']:+.4f}, bootstrap 95% CI [{p['ci95_low']:+.4f}, "
                f"{p['ci95_high']:+.4f}], p = {p['p_value']:.4g} ({p['test']})")
        return lines

    def display(self) -> pd.DataFrame:
        """The table as a reader wants it: mean +- std and the 95% CI per metric."""
        out = pd.DataFrame({"variant": self.table["variant"], "n": self.table["n"],
                            "failed": self.table["failed"]})
        for m in METRICS:
            t = self.table
            out[f"{m} mean +- std"] = [f"{_num(a)} +- {_num(b)}" for a, b in zip(t[f"{m} mean"], t[f"{m} std"])]
            out[f"{m} 95% CI"] = [f"[{_num(a)}, {_num(b)}]" for a, b in zip(t[f"{m} ci95 low"], t[f"{m} ci95 high"])]
        for column in ("params", "MACs", "RF"):
            out[column] = [f"{int(v):,}" if not math.isnan(v) else "--" for v in self.table[column]]
        out["s/epoch"] = [_num(v, 2) for v in self.table["s/epoch"]]
        return out

    def text(self) -> str:
        with pd.option_context("display.width", 250, "display.max_columns", 50,
                               "display.max_colwidth", 80):
            body = self.display().to_string(index=False)
        return "\n".join([body, *self.pairs_text(), *(f"warning: {w}" for w in self.warnings)])

    def markdown(self) -> str:
        table = self.display()
        cols = list(table.columns)
        rows = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for _, row in table.iterrows():
            rows.append("| " + " | ".join(str(row[c]) for c in cols) + " |")
        notes = [f"- {line}" for line in self.pairs_text()] + [f"- warning: {w}" for w in self.warnings]
        return "\n".join(rows + ([""] + notes if notes else [])) + "\n"

    def latex(self) -> str:
        """A booktabs table for papers (\\toprule, \\midrule, \\bottomrule)."""
        table = self.display()
        table.columns = [str(c).replace("+-", "$\\pm$").replace("%", "\\%") for c in table.columns]
        for column in table.columns:
            table[column] = table[column].astype(str).str.replace("+-", "$\\pm$", regex=False)
        return table.to_latex(index=False, escape=False).replace("_", "\\_")

    def csv(self) -> str:
        return self.table.to_csv(index=False)


def _num(value: float, digits: int = 4) -> str:
    return "--" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def load_runs(uri: str, experiment: str | None = None, parent: str | None = None) -> tuple[pd.DataFrame, list[str]]:
    """Child runs of a sweep parent, or every non-parent run of an experiment; and the swept keys."""
    reader = Reader(uri)
    swept: list[str] = []
    if parent:
        parent_run = reader.run(parent)
        swept = [k for k in parent_run.data.tags.get("sweep.keys", "").split(",") if k]
        runs = reader.children(parent_run)
    else:
        runs = [r for r in reader.search([reader.experiment_id(experiment)])
                if r.data.tags.get("sweep") != "parent"]
    if not runs:
        where = f"parent run {parent}" if parent else f"experiment {experiment}"
        raise ConfigError(f"no runs to compare in {where}")
    rows = []
    for run in runs:
        row = {"run_id": run.info.run_id, "status": run.info.status,
               "seed": run.data.params.get("seed", run.data.tags.get("seed")),
               "error": run.data.tags.get("error", "")}
        row.update({f"param:{k}": v for k, v in run.data.params.items()})
        row.update({m: run.data.metrics.get(m, math.nan) for m in (*METRICS, EPOCH_TIME)})
        row.update({f"knob:{k[5:]}": v for k, v in run.data.tags.items() if k.startswith("knob.")})
        rows.append(row)
    return pd.DataFrame(rows), swept


def _variant_keys(runs: pd.DataFrame) -> list[str]:
    """Knobs whose value differs between runs (params and failed runs' override tags)."""
    keys = []
    for column in runs.columns:
        if column.startswith(("param:", "knob:")) and is_knob(column.split(":", 1)[1]):
            key = column.split(":", 1)[1]
            if runs[column].dropna().nunique() > 1 and key not in keys:
                keys.append(key)
    return sorted(keys)


def _value(row: pd.Series, key: str) -> str:
    for column in (f"param:{key}", f"knob:{key}"):
        if column in row and isinstance(row[column], str):
            return row[column]
    return "?"


def compare(uri: str, experiment: str | None = None, parent: str | None = None,
            metric: str = DEFAULT_COMPARED) -> Comparison:
    if metric not in METRICS:
        raise ConfigError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    runs, swept = load_runs(uri, experiment, parent)
    knobs = _variant_keys(runs)
    runs["variant"] = [", ".join(f"{k.removeprefix('model.')}={_value(r, k)}" for k in knobs) or "all"
                       for _, r in runs.iterrows()]
    table_rows, warnings = [], []
    for variant, group in runs.groupby("variant", sort=True):
        done = group[group["status"] == "FINISHED"]
        row = {"variant": variant, "n": len(done), "failed": int((group["status"] == "FAILED").sum())}
        for m in METRICS:
            values = done[m].dropna().to_numpy(dtype=float)
            low, high = ci95(values)
            row.update({f"{m} mean": float(np.mean(values)) if len(values) else math.nan,
                        f"{m} std": float(np.std(values, ddof=1)) if len(values) > 1 else math.nan,
                        f"{m} ci95 low": low, f"{m} ci95 high": high})
        first = group.iloc[0]
        for label, key in (("params", "model.total_params"), ("MACs", "model.macs"),
                           ("RF", "model.receptive_field")):
            value = first.get(f"param:{key}")
            row[label] = int(value) if isinstance(value, str) and value.isdigit() else math.nan
        row["s/epoch"] = float(done[EPOCH_TIME].mean()) if len(done) else math.nan
        table_rows.append(row)
        if row["failed"]:
            errors = sorted(set(group.loc[group["status"] == "FAILED", "error"]))
            warnings.append(f"{variant}: {row['failed']} run(s) FAILED: {'; '.join(errors)[:300]}")
        if 0 < row["n"] < 3:
            warnings.append(f"{variant}: n = {row['n']} seeds (< 3); its interval is not trustworthy")
    table = pd.DataFrame(table_rows)
    if swept:
        extra = [k for k in knobs if k not in swept and k != "seed"]
        if extra:
            warnings.append(f"variants also differ in {', '.join(extra)}, which the sweep did not "
                            f"set ({', '.join(swept)}); the comparison is not controlled")
    warnings += _same_network_warnings(runs, knobs)
    pairs = _pairs(runs, metric)
    return Comparison(runs, table, knobs, pairs, warnings, metric)


def _same_network_warnings(runs: pd.DataFrame, knobs: list[str]) -> list[str]:
    column = "param:model.layers_expanded"
    if column not in runs or not any(k.startswith("model.") for k in knobs):
        return []
    networks = runs.dropna(subset=[column]).groupby(column)["variant"].unique()
    return [f"variants {', '.join(v)} build the same network ({layers})"
            for layers, v in networks.items() if len(v) > 1]


def _pairs(runs: pd.DataFrame, metric: str) -> list[dict]:
    """Every variant against the first (alphabetical) one, on shared finished seeds."""
    done = runs[(runs["status"] == "FINISHED") & runs[metric].notna()]
    variants = sorted(runs["variant"].unique())
    if len(variants) < 2:
        return []
    by_seed = done.pivot_table(index="seed", columns="variant", values=metric, aggfunc="first")
    reference, out = variants[0], []
    for other in variants[1:]:
        if reference not in by_seed or other not in by_seed:
            continue
        shared = by_seed[[reference, other]].dropna()
        if len(shared) < 2:  # no paired test on fewer than 2 shared seeds
            continue
        out.append({"a": reference, "b": other, **paired(shared[reference].to_numpy(),
                                                         shared[other].to_numpy())})
    return out


def plot(result: Comparison, uri: str, folder: Path) -> list[Path]:
    """val/acc per epoch (mean and std band per variant) and accuracy vs MACs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    reader = Reader(uri)
    fig, ax = plt.subplots(figsize=(6, 4))
    for variant, group in result.runs[result.runs["status"] == "FINISHED"].groupby("variant"):
        curves = [reader.metric_history(run_id, "val/acc") for run_id in group["run_id"]]
        length = min(len(c) for c in curves)
        if length == 0:
            continue
        values = np.array([c[:length] for c in curves])
        epochs = np.arange(1, length + 1)
        mean, std = values.mean(axis=0), values.std(axis=0)
        ax.plot(epochs, mean, marker="o", label=f"{variant} (n={len(curves)})")
        ax.fill_between(epochs, mean - std, mean + std, alpha=0.2)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    curves_png = _save(fig, ax, "epoch", "validation accuracy", folder / "val_acc_per_epoch.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    m = result.metric
    for _, row in result.table.iterrows():
        ax.errorbar(row["MACs"], row[f"{m} mean"], yerr=row[f"{m} std"] if row["n"] > 1 else None,
                    fmt="o", capsize=3, label=row["variant"])
    macs_png = _save(fig, ax, "MACs", m, folder / "accuracy_vs_macs.png")
    return [curves_png, macs_png]


def _save(fig, ax, xlabel: str, ylabel: str, path: Path) -> Path:
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_outputs(result: Comparison, folder: Path, uri: str | None = None) -> None:
    """compare.txt/.md/.csv/.tex (and the plots when a store URI is given) into a folder."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "compare.txt").write_text(result.text() + "\n")
    (folder / "compare.md").write_text(result.markdown())
    (folder / "compare.csv").write_text(result.csv())
    (folder / "compare.tex").write_text(result.latex())
    if uri:
        plot(result, uri, folder)
