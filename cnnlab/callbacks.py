"""Per-epoch bookkeeping: history.jsonl, the one-line epoch log, and epoch metrics to MLflow.

Why not Lightning's MLFlowLogger: Lightning saves last.ckpt before it hands the
epoch's training metrics to its logger, so a process killed between the two
resumes past an epoch whose metrics never reach MLflow (and a kill in other
places logs an epoch twice). Here the order is fixed and every step recoverable:

    1. history.jsonl gets the epoch's row (atomic rewrite; a repeated epoch replaces it)
    2. ModelCheckpoint saves last.ckpt (it runs after this callback)
    3. rows MLflow does not have yet, of epochs a checkpoint covers, are logged at the
       start of the next epoch and at the end of fitting, so a resumed run first sends
       what its killed self wrote (and an epoch it trains again is logged once).

MLflow steps are epochs (1, 2, ...): one value per epoch per metric, never two.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.plugins.io import TorchCheckpointIO

from cnnlab.artifacts import read_history, write_history

log = logging.getLogger("cnnlab")

EPOCH_METRICS = ("train/loss", "train/acc", "val/loss", "val/acc", "val/acc_best")


class EpochHistory(L.Callback):
    def __init__(self, path: Path, tracker=None, step_every: int = 0):
        self.path = path
        self.tracker = tracker
        self.step_every = step_every  # > 0: also log train/loss_step every this many steps
        self.started = time.perf_counter()

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.flush(up_to=trainer.current_epoch)

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.flush(up_to=trainer.current_epoch)
        self.started = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        # Validation metrics from Lightning; training ones from the module, which logs them
        # itself only after this callback has run. Every rank asks (an all-reduce under DDP).
        metrics = {**trainer.callback_metrics, **getattr(module, "train_epoch_metrics", dict)()}
        if not trainer.is_global_zero:
            return
        epoch = trainer.current_epoch + 1  # 1-based, as Keras prints it
        row = {"epoch": epoch, "seconds": round(time.perf_counter() - self.started, 3)}
        row.update({k: float(metrics[k]) for k in EPOCH_METRICS if k in metrics})
        rows = [r for r in read_history(self.path) if r["epoch"] < epoch] + [row]
        write_history(rows, self.path)
        text = "  ".join(f"{k} {row[k]:.4f}" for k in EPOCH_METRICS if k in row)
        log.info("epoch %d/%d  %s  %.1f s", epoch, trainer.max_epochs, text, row["seconds"])

    def on_fit_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        # on_fit_end, not on_train_end: a run killed after its last checkpoint resumes with
        # nothing left to train, and Lightning then skips the train hooks but not this one.
        self.flush(up_to=trainer.current_epoch)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx: int) -> None:
        if self.tracker and self.step_every and trainer.global_step % self.step_every == 0:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.tracker.log_metrics({"train/loss_step": float(loss)}, step=trainer.global_step)

    def flush(self, up_to: int | None = None) -> None:
        """Log the history rows MLflow lacks, of epochs up to `up_to` (those a checkpoint
        covers: a row written by a run killed before its checkpoint is trained again)."""
        if self.tracker is None:
            return
        logged = {m.step for m in self.tracker.metric_history("val/loss")}
        for row in read_history(self.path):
            if row["epoch"] not in logged and (up_to is None or row["epoch"] <= up_to):
                values = {k: row[k] for k in EPOCH_METRICS if k in row}
                self.tracker.log_metrics({**values, "time/epoch_s": row["seconds"]}, step=row["epoch"])


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint to a temporary file, then rename it over the old one: a process
    killed mid-write leaves the previous complete checkpoint, never a truncated one."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        path = Path(path)
        partial = path.with_name(path.name + ".partial")
        super().save_checkpoint(checkpoint, partial, storage_options)
        os.replace(partial, path)
