"""The LightningModule: cross-entropy on logits, torchmetrics accuracy, per-epoch logs."""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import partial
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from cnnlab.errors import TrainingError
from cnnlab.training.optim import make_optimizer, make_scheduler


class Classifier(L.LightningModule):
    """Trains a network that returns logits; `predict_step` returns probabilities.

    Logged once per epoch: train/loss, train/acc, val/loss, val/acc,
    val/acc_best; after fitting, test/loss and test/acc. Accuracy is Keras's
    `accuracy`, the fraction of samples whose arg-max is the label: counted
    on the device during training, torchmetrics' micro-averaged multiclass
    accuracy (the same definition) for validation and test.
    """

    def __init__(self, network: nn.Module, optim: Mapping[str, Any], num_classes: int,
                 channels_last: bool = False):
        super().__init__()
        self.network = network
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.optim = dict(optim)
        # validate_args=False: the inputs are ours and well-formed; the checks cost a host
        # sync per step. update() rather than forward(): no per-batch value is needed.
        accuracy = partial(MulticlassAccuracy, num_classes, average="micro", validate_args=False)
        self.val_acc, self.test_acc = accuracy(), accuracy()
        # A plain float, saved in checkpoints, so a resumed run keeps its best.
        self.val_acc_best = 0.0

    def __setattr__(self, name: str, value: Any) -> None:
        # Lightning's loops set bookkeeping attributes on the module (_current_fx_name and others)
        # about 35 times a training step, and nn.Module.__setattr__ looks through the parameters,
        # buffers and submodules each time: about 1 us a call, 1% of the baseline's step on the CPU.
        # A name already in the instance dict is none of those (nn.Module keeps them in its own
        # dicts, and moves a name out of __dict__ when one is assigned), so a value that is not a
        # tensor or a module goes where nn.Module would put it, directly.
        if name in self.__dict__ and not isinstance(value, (torch.Tensor, nn.Module)):
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x.contiguous(memory_format=self.memory_format))  # (B, C, H, W) -> (B, classes) logits

    def _loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y, label_smoothing=self.optim["label_smoothing"])

    def on_train_epoch_start(self) -> None:
        # Epoch sums kept on the device: no host sync and no self.log per step. Lightning's
        # self.log costs about 0.6 ms a call on CPU (it walks its bookkeeping objects), which
        # was most of cnnlab's overhead over a hand-written loop at batch 32.
        self._loss_sum = torch.zeros((), device=self.device)
        self._correct = torch.zeros((), dtype=torch.long, device=self.device)
        self._seen = 0
        self._epoch_metrics: dict[str, float] | None = None

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = self._loss(logits, y)
        self._loss_sum += loss.detach() * len(y)
        self._correct += (logits.detach().argmax(dim=1) == y).sum()  # Keras's accuracy
        self._seen += len(y)
        return loss

    def train_epoch_metrics(self) -> dict[str, float]:
        """train/loss and train/acc of the epoch, over all processes (one host sync; under DDP one
        all-reduce, so every rank must call it: EpochHistory does, before this module's hook)."""
        if self._epoch_metrics is None:
            sums = torch.stack([self._loss_sum, self._correct.to(self._loss_sum.dtype),
                                torch.tensor(float(self._seen), device=self.device)])
            if self.trainer.world_size > 1:
                sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
            loss_sum, correct, seen = sums.tolist()
            seen = max(seen, 1.0)
            self._epoch_metrics = {"train/loss": loss_sum / seen, "train/acc": correct / seen}
        return self._epoch_metrics

    def on_train_epoch_end(self) -> None:
        metrics = self.train_epoch_metrics()
        if not math.isfinite(metrics["train/loss"]):
            # Raised before ModelCheckpoint runs (it comes after the module), so last.ckpt
            # stays the last good epoch's.
            raise TrainingError(
                f"the training loss became {metrics['train/loss']} in epoch {self.current_epoch + 1}; "
                f"lower optim.lr, check the data, or clip gradients (trainer.gradient_clip_val). "
                f"The last good checkpoint is kept")
        for name, value in metrics.items():  # already over all ranks: sync_dist only agrees
            self.log(name, value, prog_bar=True, sync_dist=True)

    def _evaluate(self, batch, stage: str, accuracy: MulticlassAccuracy) -> None:
        x, y = batch
        logits = self(x)
        accuracy.update(logits, y)
        # sync_dist: the mean over all ranks' batches under DDP (a no-op in one process).
        self.log(f"{stage}/loss", self._loss(logits, y), on_step=False, on_epoch=True, prog_bar=True,
                 sync_dist=True)
        self.log(f"{stage}/acc", accuracy, on_step=False, on_epoch=True, prog_bar=True)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_acc)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        # compute() before Lightning resets the metric at the end of the epoch.
        self.val_acc_best = max(self.val_acc_best, float(self.val_acc.compute()))
        self.log("val/acc_best", self.val_acc_best, prog_bar=True, sync_dist=True)  # equal on all ranks

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_acc)

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return torch.softmax(self(x), dim=1)

    def configure_optimizers(self):
        optimizer = make_optimizer(self.parameters(), self.optim)
        scheduler = make_scheduler(optimizer, self.optim, self.trainer.max_epochs,
                                   int(self.trainer.estimated_stepping_batches))
        return optimizer if scheduler is None else {"optimizer": optimizer, "lr_scheduler": scheduler}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["val_acc_best"] = self.val_acc_best
        # Dropout draws from torch's global generator: with its state in the checkpoint, a
        # resumed run draws the same masks as an uninterrupted one (batch order is seeded
        # by (seed, epoch) already).
        checkpoint["rng_torch"] = torch.get_rng_state()
        if torch.cuda.is_available():
            checkpoint["rng_cuda"] = torch.cuda.get_rng_state_all()
        progress = self.trainer.fit_loop.epoch_loop.batch_progress
        if self.trainer.training and 0 < progress.current.completed and not progress.is_last_batch:
            # Written mid-epoch (on SIGTERM): the epoch's sums so far, which a resumed run continues;
            # Lightning does not call on_train_epoch_start again for an epoch it resumes.
            checkpoint["train_epoch_sums"] = {"loss_sum": self._loss_sum.detach().cpu(),
                                              "correct": self._correct.detach().cpu(), "seen": self._seen}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.val_acc_best = float(checkpoint.get("val_acc_best", 0.0))
        if "rng_torch" in checkpoint:
            torch.set_rng_state(checkpoint["rng_torch"])
        if "rng_cuda" in checkpoint and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(checkpoint["rng_cuda"])
        self._resumed_sums = checkpoint.get("train_epoch_sums")  # set once the module is on its device

    def on_train_start(self) -> None:
        sums = getattr(self, "_resumed_sums", None)
        if sums is not None:  # resuming mid-epoch: continue the epoch's sums
            self._loss_sum = sums["loss_sum"].to(self.device)
            self._correct = sums["correct"].to(self.device)
            self._seen = int(sums["seen"])
            self._epoch_metrics = None
            self._resumed_sums = None
