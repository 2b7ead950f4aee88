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

A tracking server that goes away mid-training does not stop training (the choice:
keep going and send later, rather than stop and resume). A send that cannot reach
it logs one warning and training goes on; the epochs stay in history.jsonl, and
throttled step metrics, which have no other record, are kept with their timestamps
in mlflow_pending.jsonl beside it. Each later epoch boundary (and, for long epochs,
a step metric at most every RETRY_S seconds) asks the server's /health; when it
answers, the pending values go first, then every epoch MLflow lacks, so each epoch
step still arrives exactly once. At the end of fitting the flush waits for the
server (tracking.outage_wait_s); if it stays away the job stops with
TrackingUnavailable and both files stay, so the same command resumes and sends them.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import lightning as L

from cnnlab.tracking.store import is_unreachable, root_cause
from cnnlab.training.artifacts import read_history, write_history
from cnnlab.training.run_text import epoch_line
from cnnlab.vocabulary import EPOCH_METRICS, LEARNING_RATE
from cnnlab.vocabulary import EPOCH_TIME as EPOCH_KEY

LOGGED = (*EPOCH_METRICS, LEARNING_RATE)  # a history row's metrics, as MLflow gets them

log = logging.getLogger("cnnlab")

PENDING_FILE = "mlflow_pending.jsonl"  # step metrics kept through a tracking-server outage
RETRY_S = 30.0  # while the server is away, ask again at most this often between epoch boundaries


class EpochHistory(L.Callback):
    def __init__(self, path: Path, tracker=None, step_every: int = 0):
        self.path = path
        self.pending = path.with_name(PENDING_FILE)
        self.tracker = tracker
        self.step_every = step_every  # > 0: also log train/loss_step every this many steps
        self.started = time.perf_counter()
        self.away_since: float | None = None  # monotonic time the tracking server was found away
        self.last_try = 0.0
        self.sent: set[int] = set()  # epochs MLflow has, as far as this process knows
        self.lr: float | None = None  # the first param group's learning rate as this epoch started

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.flush(up_to=trainer.current_epoch)

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.flush(up_to=trainer.current_epoch)
        self.started = time.perf_counter()
        # The rate the epoch starts with: Lightning steps epoch schedulers after the last batch, before
        # on_train_epoch_end, so read there it would be the next epoch's. (A per-step schedule such as
        # onecycle changes it within the epoch; the row keeps the epoch's first.)
        self.lr = float(trainer.optimizers[0].param_groups[0]["lr"]) if trainer.optimizers else None

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        # Validation metrics from Lightning; training ones from the module, which logs them
        # itself only after this callback has run. Every rank asks (an all-reduce under DDP).
        metrics = {**trainer.callback_metrics, **getattr(module, "train_epoch_metrics", dict)()}
        if not trainer.is_global_zero:
            return
        self.record(trainer.current_epoch + 1, trainer.max_epochs, metrics)  # 1-based, as Keras prints it

    def record(self, epoch: int, max_epochs: int, metrics, seconds: float | None = None,
               label: str = "") -> None:
        """history.jsonl gets this epoch's row (a repeated epoch replaces its row) and the console
        one line. The stacked path (cnnlab.training.stacked_run) calls it once per seed."""
        if seconds is None:
            seconds = time.perf_counter() - self.started
        row = {"epoch": epoch, "seconds": round(seconds, 3)}
        row.update({k: float(metrics[k]) for k in EPOCH_METRICS if k in metrics})
        if self.lr is not None:
            row[LEARNING_RATE] = self.lr
        rows = [r for r in read_history(self.path) if r["epoch"] < epoch] + [row]
        write_history(rows, self.path)
        log.info("%s%s", label, epoch_line(row, max_epochs))

    def on_fit_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        # on_fit_end, not on_train_end: a run killed after its last checkpoint resumes with
        # nothing left to train, and Lightning then skips the train hooks but not this one.
        # Here the server is needed: wait for it (tracking.outage_wait_s) rather than go on.
        self.flush(up_to=trainer.current_epoch, wait=True)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx: int) -> None:
        if self.tracker and self.step_every and trainer.global_step % self.step_every == 0:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.log_or_keep({"train/loss_step": float(loss)}, trainer.global_step, up_to=trainer.current_epoch)

    def log_or_keep(self, metrics: dict[str, float], step: int, up_to: int | None = None) -> None:
        """Send values now, or keep them in mlflow_pending.jsonl while the server is away."""
        entry = {"step": step, "timestamp": int(time.time() * 1000), "metrics": metrics}
        if self.away_since is None:
            try:
                self.tracker.log_metrics(metrics, step, timestamp_ms=entry["timestamp"], patient=False)
                return
            except Exception as error:
                if not is_unreachable(error):
                    raise
                self._keep(entry)
                self._went_away(error)
                return
        self._keep(entry)
        if time.monotonic() - self.last_try >= RETRY_S:
            self.flush(up_to=up_to)

    def flush(self, up_to: int | None = None, wait: bool = False) -> None:
        """Send what MLflow lacks: kept step metrics, then the history rows of epochs up to
        `up_to` (those a checkpoint covers: a row written by a run killed before its
        checkpoint is trained again). Without `wait`, an unreachable server is noted and
        training goes on; with it, the tracker waits for the server or raises."""
        if self.tracker is None:
            return
        if wait:
            self.tracker.patiently(lambda: self._send(up_to), "sending the epochs' metrics")
            self._back()
            return
        self.last_try = time.monotonic()
        if self.away_since is not None and not self.tracker.reachable():
            log.debug("tracking server still unreachable; %d epoch(s) kept in history.jsonl", len(self._unsent()))
            return
        try:
            self._send(up_to)
        except Exception as error:
            if not is_unreachable(error):
                raise
            self._went_away(error)
            return
        self._back()

    def _send(self, up_to: int | None) -> None:
        self._send_pending()
        logged = {m.step for m in self.tracker.metric_history(EPOCH_KEY, patient=False)}
        self.sent = logged
        for row in read_history(self.path):
            if row["epoch"] not in logged and (up_to is None or row["epoch"] <= up_to):
                values = {k: row[k] for k in LOGGED if k in row}
                self.tracker.log_metrics({**values, EPOCH_KEY: row["seconds"]}, step=row["epoch"], patient=False)
                self.sent.add(row["epoch"])

    def _send_pending(self) -> None:
        entries = self._kept()
        for index, entry in enumerate(entries):
            try:
                self.tracker.log_metrics(entry["metrics"], entry["step"], timestamp_ms=entry["timestamp"],
                                         patient=False)
            except BaseException:
                write_history(entries[index:], self.pending)  # what was sent is not sent twice
                raise
        if entries:
            self.pending.unlink()

    def _keep(self, entry: dict) -> None:
        # Appended, not rewritten: a long outage keeps many values. The newline goes first, so a
        # line cut short by a kill stays a line of its own (skipped, with a warning, on reading).
        with open(self.pending, "a") as out:
            out.write("\n" + json.dumps(entry))

    def _kept(self) -> list[dict]:
        if not self.pending.exists():
            return []
        entries = []
        for line in self.pending.read_text().splitlines():
            if not line.strip():
                continue
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("%s: skipping a line cut short when its process was killed: %r",
                            self.pending, line[:200])
        return entries

    def _unsent(self) -> list[int]:
        return [row["epoch"] for row in read_history(self.path) if row["epoch"] not in self.sent]

    def _went_away(self, error: BaseException) -> None:
        if self.away_since is None:
            self.away_since = time.monotonic()
            log.warning("tracking server %s unreachable (%s); training goes on: %d epoch(s) kept in %s, "
                        "step metrics in %s, sent when it returns", self.tracker.uri, root_cause(error),
                        len(self._unsent()), self.path.name, self.pending.name)

    def _back(self) -> None:
        if self.away_since is not None:
            log.info("tracking server %s is back after %.0f s; everything kept was sent", self.tracker.uri,
                     time.monotonic() - self.away_since)
            self.away_since = None
