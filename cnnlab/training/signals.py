"""SIGTERM and SIGINT: stop at a safe point, say so in one line, and leave a run that resumes.

A scheduler that preempts a job (SLURM's `--signal`, Kubernetes, `timeout`) sends SIGTERM and
waits a little before SIGKILL; Ctrl-C sends SIGINT. Lightning noted SIGTERM, stopped at the next
batch with a SystemExit of status 0 and cnnlab marked the run FAILED: a preempted job looked
like a success to the scheduler and like a crash in MLflow. Now:

- SIGTERM during training lets the batch in progress finish, writes last.ckpt there (the memory
  pipeline, whose batches resume exactly: cnnlab.data.batches.TensorBatches), and stops; at any
  other moment it stops at once (the last end-of-epoch checkpoint stays the resume point).
- SIGINT stops at once (Python's KeyboardInterrupt); the last end-of-epoch checkpoint stays.
- Either way the MLflow run is marked KILLED with a `signal` tag naming the signal, the command
  prints one `error:` line and exits with 128 + the signal's number (143, 130), and running the
  same command again resumes the run, clears the tag and finishes it.
- A step that does not end (an absurdly large convolution ran for 11 minutes on one batch)
  would hold all of that off: Python runs signal handlers only between bytecodes, so neither
  Lightning's batch boundary nor a KeyboardInterrupt comes while one C++ call runs. A watchdog
  thread hears the signal through `signal.set_wakeup_fd` (written by the C-level handler at
  once); if the process is still running STEP_GRACE_S later, or on a second signal, it marks
  the run KILLED, prints the line and exits with 128 + the signal. The last checkpoint on disk
  (end of the last epoch) stays the resume point.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cnnlab.errors import Interrupted

log = logging.getLogger("cnnlab")

SIGNALS = (signal.SIGTERM, signal.SIGINT)
_state = {"received": None, "deferred": False}  # the signal this process got; inside Lightning's fit/test
STEP_GRACE_S = 10.0  # a batch boundary comes within milliseconds on any sane model; SLURM waits 30 s before SIGKILL
_watched: dict = {"trackers": []}  # the MLflow runs the watchdog marks KILLED if it must exit


def _handler(signum: int, frame) -> None:
    _state["received"] = signum
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    if not _state["deferred"]:
        raise Interrupted(signum)
    # Inside fit or test: Lightning's own handler (which calls this one too) has noted it, and its
    # loops stop at the next batch boundary with SIGTERMException; Preemption saves there.


@contextmanager
def handled() -> Iterator[None]:
    """SIGTERM and SIGINT handled as the module says, for the duration; the handlers before are
    put back after. Outside the main thread (a launcher's worker thread) signals cannot be handled."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {signum: signal.getsignal(signum) for signum in SIGNALS}
    outer = dict(_state)
    _state.update(received=None, deferred=False)
    for signum in SIGNALS:
        signal.signal(signum, _handler)
    watchdog = _Watchdog()
    try:
        yield
    except KeyboardInterrupt as error:  # Ctrl-C before or after the run existed: one line too
        if _state["received"] != signal.SIGINT:
            raise
        raise interrupted(signal.SIGINT) from error
    finally:
        watchdog.stop()
        for signum, handler in before.items():
            signal.signal(signum, handler)
        if _state["received"] is None:
            _state.update(outer)


def watch(*trackers) -> None:
    """The runs (a lone run's, or every seed's of a stack) the watchdog marks KILLED if a signal
    cannot be handled in time; None for a run not tracked."""
    _watched["trackers"] = [tracker for tracker in trackers if tracker is not None]


class _Watchdog:
    """Exits the process STEP_GRACE_S after SIGTERM or SIGINT, or at a second one, when the main
    thread is stuck in a long C++ call and cannot stop itself (see the module's docstring)."""

    def __init__(self) -> None:
        self._read, write = os.pipe()
        os.set_blocking(write, False)
        self._write = write
        self._previous_fd = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._listen, name="cnnlab-signal-watchdog", daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        first: float | None = None
        signum = signal.SIGTERM
        while not self._stopped.is_set():
            import select

            timeout = None if first is None else max(0.0, first + STEP_GRACE_S - time.monotonic())
            ready, _, _ = select.select([self._read], [], [], timeout)
            if self._stopped.is_set():
                return
            if not ready:  # the grace period ran out and the process is still here
                self._exit(signum, f"the step in progress did not end within {STEP_GRACE_S:g} s")
            try:
                got = os.read(self._read, 64)
            except OSError:  # closed by stop()
                return
            for byte in got:
                if byte not in (signal.SIGTERM, signal.SIGINT):
                    continue
                if first is not None:
                    self._exit(byte, f"a second {signal.Signals(byte).name}")
                first, signum = time.monotonic(), byte

    def _exit(self, signum: int, why: str) -> None:
        name = signal.Signals(signum).name
        trackers = _watched["trackers"]
        for tracker in trackers:
            try:
                tracker.mark_failed(Interrupted(signum), "KILLED", tags={"signal": name})
            except Exception as error:  # exiting anyway: say why the run may still look RUNNING
                print(f"warning: could not mark MLflow run {tracker.run_id} KILLED: {error}", file=sys.stderr)
        marked = "" if not trackers else ("; the MLflow run is marked KILLED" if len(trackers) == 1
                                          else f"; the {len(trackers)} MLflow runs are marked KILLED")
        print(f"error: stopped by {name} ({why}); exiting now{marked}; the same command "
              f"resumes from the last completed epoch", file=sys.stderr, flush=True)
        logging.shutdown()
        os._exit(128 + signum)

    def stop(self) -> None:
        self._stopped.set()
        signal.set_wakeup_fd(self._previous_fd)
        os.close(self._write)  # wakes the thread's select
        self._thread.join(timeout=5)
        os.close(self._read)
        _watched["trackers"] = []


def stopped_by(error: BaseException) -> int | None:
    """The signal that stopped the job with this error, if a signal did: Lightning turns SIGTERM
    into SIGTERMException (a SystemExit) and a KeyboardInterrupt into sys.exit(1)."""
    if isinstance(error, Interrupted):
        return error.signum
    if isinstance(error, (SystemExit, KeyboardInterrupt)) and _state["received"] is not None:
        return _state["received"]
    return None


def preemption_callback(last: Path, exact: bool):
    """A Lightning callback for fit and test: lets Lightning stop at the next batch boundary on
    SIGTERM, and writes last.ckpt there when that boundary is inside a training epoch (`exact`:
    the batches after it resume exactly, which the memory pipeline's do). Its `saved_at` says
    where it wrote one. (Built here so that importing this module does not import Lightning.)"""
    import lightning as L
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    class Preemption(L.Callback):
        def __init__(self) -> None:
            self.saved_at: tuple[int, int, int] | None = None  # epoch (1-based), batch, batches in the epoch

        def setup(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
            _state["deferred"] = True

        def teardown(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
            _state["deferred"] = False

        def on_exception(self, trainer: L.Trainer, module: L.LightningModule, exception: BaseException) -> None:
            progress = trainer.fit_loop.epoch_loop.batch_progress
            done = progress.current.completed
            if not (isinstance(exception, SIGTERMException) and exact and trainer.training
                    and 0 < done and not progress.is_last_batch):
                return  # not inside a training epoch: the last end-of-epoch checkpoint is where to resume
            trainer.save_checkpoint(last)
            self.saved_at = (trainer.current_epoch + 1, done, trainer.num_training_batches)
            log.info("SIGTERM: wrote %s after batch %d of %d of epoch %d", last, done,
                     trainer.num_training_batches, trainer.current_epoch + 1)

    return Preemption()


def record_stop(error: BaseException, tracker, preemption) -> Interrupted | None:
    """Mark the MLflow run of a job that stopped with `error`: KILLED with a `signal` tag when a
    signal stopped it, else FAILED. Returns the error to raise instead (Interrupted), if any."""
    signum = stopped_by(error)
    instead = interrupted(signum, preemption, marked=bool(tracker)) if signum is not None else None
    if tracker:  # with the tracking server away, it warns and leaves the run to resume
        killed = signum is not None or isinstance(error, KeyboardInterrupt)
        tracker.mark_failed(instead or error, "KILLED" if killed else "FAILED",
                            tags={"signal": signal.Signals(signum).name} if signum else None)
    return instead


def interrupted(signum: int, preemption=None, marked: bool = False) -> Interrupted:
    """The error the command line prints for a run a signal stopped."""
    name = signal.Signals(signum).name
    if getattr(preemption, "saved_at", None):
        epoch, batch, batches = preemption.saved_at
        where = (f"a checkpoint was written after batch {batch} of {batches} of epoch {epoch}: the same "
                 f"command resumes there")
    else:
        where = "the same command resumes from the last completed epoch"
    return Interrupted(signum, f"stopped by {name}{'; the MLflow run is marked KILLED' if marked else ''}; {where}")
