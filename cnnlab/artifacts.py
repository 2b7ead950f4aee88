"""Files a run leaves behind, as the chapter's Keras program did: weights.txt and curves.png."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from torch import nn


def write_weights(network: nn.Module, path: Path) -> None:
    """Every trainable variable: name, shape and all of its values (the chapter's dump)."""
    with open(path, "w") as out:
        for name, param in network.named_parameters():
            if not param.requires_grad:
                continue
            values = param.detach().cpu().numpy()
            out.write(f"{name} shape={tuple(values.shape)}\n")
            # One line per last-axis row. savetxt, not array2string: 30x faster on the
            # baseline's 198k values (2 s per run otherwise).
            rows = values.reshape(-1, values.shape[-1]) if values.ndim > 1 else values[None]
            np.savetxt(out, rows, fmt="%.9g", delimiter=", ")  # 9 digits round-trip float32
            out.write("\n")


def read_history(path: Path) -> list[dict]:
    """Per-epoch metrics written by `EpochHistory`, one JSON object a line."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_history(rows: list[dict], path: Path) -> None:
    """Rewrite atomically: a kill mid-write never leaves a half line behind."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    os.replace(tmp, path)


def plot_curves(rows: list[dict], path: Path, title: str = "") -> None:
    """The chapter's two panels: accuracy and loss, train and validation, per epoch."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [row["epoch"] for row in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("acc", "loss")):
        for stage, style in (("train", "o-"), ("val", "s--")):
            values = [row.get(f"{stage}/{metric}") for row in rows]
            ax.plot(epochs, values, style, label=f"{stage}")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("accuracy" if metric == "acc" else "loss")
        ax.set_title(f"{'Accuracy' if metric == 'acc' else 'Loss'} {title}".strip())
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
