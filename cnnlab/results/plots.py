"""Comparison plots: validation accuracy per epoch (mean and sample-std band per variant) and
accuracy against MACs."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cnnlab.tracking.reader import Reader

if TYPE_CHECKING:
    from cnnlab.results.compare import Comparison


def save_figure(fig, ax, xlabel: str, ylabel: str, path: Path) -> Path:
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot(result: Comparison, uri: str, folder: Path) -> list[Path]:
    """val/acc per epoch and accuracy vs MACs, into `folder`. The band is the sample standard
    deviation (n - 1), as in the table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    reader = Reader(uri)
    fig, ax = plt.subplots(figsize=(6, 4))
    used = result.runs[result.runs["run_id"].isin(result.used_runs)]
    for variant in result.order:
        group = used[used["variant"] == variant]
        curves = [reader.metric_history(run_id, "val/acc") for run_id in group["run_id"]]
        length = min((len(c) for c in curves), default=0)
        if length == 0:
            continue
        values = np.array([c[:length] for c in curves])
        epochs = np.arange(1, length + 1)
        mean = values.mean(axis=0)
        std = values.std(axis=0, ddof=1) if len(curves) > 1 else np.zeros(length)
        ax.plot(epochs, mean, marker="o", label=f"{variant} (n={len(curves)})")
        ax.fill_between(epochs, mean - std, mean + std, alpha=0.2)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    curves_png = save_figure(fig, ax, "epoch", "validation accuracy", folder / "val_acc_per_epoch.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    m = result.metric
    for _, row in result.table.iterrows():
        ax.errorbar(row["MACs"], row[f"{m} mean"], yerr=row[f"{m} std"] if row[f"{m} n"] > 1 else None,
                    fmt="o", capsize=3, label=row["variant"])
    macs_png = save_figure(fig, ax, "MACs", m, folder / "accuracy_vs_macs.png")
    return [curves_png, macs_png]
