"""The progress bar of a run on a terminal: one line below the log, counting epochs from 1.

Written here rather than taken from Lightning: its RichProgressBar and TQDMProgressBar number
epochs from 0 ("Epoch 0/4" for the first of five), show every metric logged with prog_bar
(a column that wraps into several lines at 80 columns, one epoch behind), and draw with their
own console, which the log lines do not go through, so each epoch's line was overwritten.
This one shows the phase, the batches and the running loss; the epoch's metrics are in its
log line (cnnlab.training.epoch_log). Log records reach the terminal above the bar because
Rich's live display replaces sys.stdout while it runs and cnnlab's ConsoleHandler writes to
sys.stdout as it is at the time (cnnlab.training.console).
"""

from __future__ import annotations

import time

import lightning as L
from lightning.pytorch.callbacks import ProgressBar
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

LOSS_EVERY_S = 0.5  # read the running loss at most this often (reading it waits for the device)


class EpochBar(ProgressBar):
    def __init__(self) -> None:
        super().__init__()
        self.enabled = True
        self.progress: Progress | None = None
        self.task = None
        self.loss_read = 0.0

    def disable(self) -> None:
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    def _show(self, description: str, total: int | float) -> None:
        if not self.enabled:
            return
        if self.progress is None:
            self.progress = Progress(
                TextColumn("{task.description}"), BarColumn(bar_width=None), MofNCompleteColumn(),
                TimeRemainingColumn(compact=True), TextColumn("{task.fields[loss]}"),
                transient=True, expand=True)  # erased when it stops: the log lines stay
            self.progress.start()
        if self.task is not None:
            self.progress.remove_task(self.task)
        finite = total if total != float("inf") else None  # an iterable without a length
        self.task = self.progress.add_task(description, total=finite, loss="")

    def _advance(self, loss: str | None = None) -> None:
        if self.progress is not None and self.task is not None:
            if loss is None:
                self.progress.update(self.task, advance=1)  # drawn by Rich's refresh thread, 10 times a second
            else:
                self.progress.update(self.task, advance=1, loss=loss, refresh=True)  # at most every LOSS_EVERY_S

    def _stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        self.progress, self.task = None, None

    def _epoch(self, trainer: L.Trainer) -> str:
        return f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"  # 1-based, as the log lines

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._show(self._epoch(trainer), self.total_train_batches)
        self.loss_read = 0.0  # the new epoch's bar shows its first batch's loss

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx: int) -> None:
        loss = None
        if time.monotonic() - self.loss_read >= LOSS_EVERY_S:
            # The step's loss as training_step returned it (Lightning divides it by
            # accumulate_grad_batches); not self.log(prog_bar=True), which costs ~0.6 ms every step.
            self.loss_read = time.monotonic()
            value = outputs["loss"] if isinstance(outputs, dict) else outputs
            loss = f"loss {float(value) * trainer.accumulate_grad_batches:.4f}"
        self._advance(loss)

    def on_validation_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._show(f"{self._epoch(trainer)} val", self.total_val_batches)

    def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx: int, dataloader_idx: int = 0):
        self._advance()

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._stop()

    def on_test_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._show("test", sum(trainer.num_test_batches))

    def on_test_batch_end(self, trainer, module, outputs, batch, batch_idx: int, dataloader_idx: int = 0):
        self._advance()

    def on_test_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._stop()

    def on_exception(self, trainer: L.Trainer, module: L.LightningModule, exception: BaseException) -> None:
        self._stop()  # the terminal gets its cursor back before the error is printed
