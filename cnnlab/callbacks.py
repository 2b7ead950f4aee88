"""Lightning callback: a per-epoch history file and a one-line log per epoch."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import lightning as L

from cnnlab.artifacts import read_history, write_history

log = logging.getLogger("cnnlab")

EPOCH_METRICS = ("train/loss", "train/acc", "val/loss", "val/acc", "val/acc_best")


class EpochHistory(L.Callback):
    """Appends each finished epoch's metrics to history.jsonl in the run directory.

    It feeds curves.png and the per-epoch log line, works with tracking off,
    and survives resume: rows from epochs a resumed run repeats are replaced.
    """

    def __init__(self, path: Path):
        self.path = path
        self.started = time.perf_counter()

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.started = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        metrics = trainer.callback_metrics
        epoch = trainer.current_epoch + 1  # 1-based, as Keras prints it
        row = {"epoch": epoch, "seconds": round(time.perf_counter() - self.started, 3)}
        row.update({k: float(metrics[k]) for k in EPOCH_METRICS if k in metrics})
        module.log("time/epoch_s", row["seconds"])  # compare reports seconds per epoch
        rows = [r for r in read_history(self.path) if r["epoch"] < epoch] + [row]
        write_history(rows, self.path)
        text = "  ".join(f"{k} {row[k]:.4f}" for k in EPOCH_METRICS if k in row)
        log.info("epoch %d/%d  %s  %.1f s", epoch, trainer.max_epochs, text, row["seconds"])
