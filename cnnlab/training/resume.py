"""Resuming: which checkpoint a run continues from, whether it is already done, and the MLflow
run it continues (a run directory remembers its run in `mlflow_run_id`)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from cnnlab.errors import CodeChanged, ConfigError, RunInUse
from cnnlab.model.plan import ModelPlan

log = logging.getLogger("cnnlab")
RUN_ID_FILE = "mlflow_run_id"
LOCK_FILE = ".cnnlab.lock"  # held (flock) by the process training in a run directory
OWNER_FILE = ".cnnlab.owner"  # which process that is, for the error line of a second one
DATA_FILE = "data.fingerprint"  # the pixels a run directory's run trains on (TensorData.fingerprint)
LOCK_WAIT_S = 2.0  # a process that is just ending lets go within this; a running one does not


@contextmanager
def run_directory_lock(run_dir: Path, held: bool = True) -> Iterator[None]:
    """Only one process trains in a run directory at a time. Two identical commands started
    together both attached to one MLflow run and trained the same epochs; now the second waits
    LOCK_WAIT_S for the lock and stops with RunInUse. The kernel releases the lock when its process
    dies (SIGKILL included), so a rerun after a crash is never locked out. `held=False` (DDP's
    extra ranks, which share rank zero's directory) takes no lock."""
    if not held:
        yield
        return
    import json
    import os
    import socket

    from filelock import FileLock, Timeout

    run_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(run_dir / LOCK_FILE), timeout=LOCK_WAIT_S)
    try:
        lock.acquire()
    except Timeout:
        try:
            owner = json.loads((run_dir / OWNER_FILE).read_text())
            who = f"process {owner['pid']} on {owner['host']}"
        except (OSError, ValueError, KeyError, TypeError):
            who = "another process"
        raise RunInUse(f"the run in {run_dir} is in use by another process ({who} trains in it now); "
                       f"wait for it to end, or change an override to train a separate run") from None
    try:
        (run_dir / OWNER_FILE).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
        yield
    finally:
        lock.release()


def run_directory_for_data(run_dir: Path, fingerprint: str) -> Path:
    """The folder a run on data with this fingerprint uses: `run_dir`, or, when `run_dir` holds a
    run on other pixels (the same command with another data.archive or data.root), the sibling
    `<run_dir>-data-<fingerprint[:12]>`, with one line saying so. A run directory records its
    data in DATA_FILE the first time; one from before that record existed is taken as it is."""
    run_dir.mkdir(parents=True, exist_ok=True)
    recorded = run_dir / DATA_FILE
    if not recorded.exists():
        recorded.write_text(fingerprint + "\n")
        return run_dir
    before = recorded.read_text().strip()
    if before == fingerprint:
        return run_dir
    other = run_dir.with_name(f"{run_dir.name}-data-{fingerprint[:12]}")
    log.warning("the run in %s trained on other data (fingerprint %s..., now %s...): not resuming it; "
                "this data's run is in %s", run_dir, before[:12], fingerprint[:12], other)
    return run_directory_for_data(other, fingerprint)


def open_run(cfg: DictConfig, runs: Path, run_dir: Path, name: str, tags: dict,
             resume_from: Path | None):
    """The MLflow run this job logs to, and the stored result when nothing is left to do.

    A run directory remembers its MLflow run: running the same command again continues
    that run (from last.ckpt, or from scratch if it died before its first checkpoint)
    instead of leaving a second one; a finished run that already has its epochs is done.
    Either way one line says which run it is, its epochs and whether the code or the packages
    changed since it started (`tags` hold the provenance of now). Continuing a run into changed
    code is refused (run.resume=force allows it); run.fresh=true never gets here with a run.
    """
    from cnnlab.tracking.provenance import changes_since
    from cnnlab.tracking.store import artifact_location, check_tracking, tracking_uri
    from cnnlab.tracking.writer import Tracker

    uri = tracking_uri(cfg.tracking.uri, runs)
    check_tracking(uri, cfg.tracking.timeout_s)
    # From here on a tracking server that goes away is waited for (then a clear error), and
    # training itself keeps going through an outage (cnnlab.training.epoch_log).
    tracker = Tracker(uri, runs, outage_wait_s=cfg.tracking.outage_wait_s, probe_timeout_s=cfg.tracking.timeout_s)
    id_file = run_dir / RUN_ID_FILE
    previous = id_file.read_text().strip() if id_file.is_file() else None
    found = tracker.run(previous) if previous else None
    if found is not None:
        changes = changes_since(found.data.tags, tags)
        asked = cfg.trainer.max_epochs
        done = already_complete(resume_from, asked) if found.info.status == "FINISHED" else None
        if done is not None:
            tracker.run_id = previous  # the finished run, read back but not reopened
            log.info("%s", finished_line(name, previous, epochs_done(resume_from), asked, changes))
            return tracker, done
        if changes and cfg.run.resume != "force":
            raise CodeChanged(refusal_line(name, previous, epochs_done(resume_from), asked, changes))
        if tracker.resume(previous):
            log.info("%s", resume_line(name, previous, epochs_done(resume_from), asked, changes))
            return tracker, None
    tracker.start(cfg.tracking.experiment, name, tags=tags,
                  artifact_location=artifact_location(uri, runs, cfg.tracking.experiment))
    id_file.write_text(tracker.run_id)
    return tracker, None


FRESH_HINT = "run.fresh=true trains it again as a new run beside this one"


def _changed(changes: list[str]) -> str:
    return ("changed since: " + ", ".join(changes)) if changes else "code and packages unchanged since"


def finished_line(name: str, run_id: str, done: int, asked: int, changes: list[str]) -> str:
    """Found finished: nothing to do. Not an error even if the code changed (the run is whole)."""
    hint = f"; {FRESH_HINT}" if changes else (f"; raise trainer.max_epochs to continue it, or {FRESH_HINT}")
    return (f"run {name} (MLflow run {run_id}) already trained {done} epochs (asked: {asked}); "
            f"{_changed(changes)}{hint}")


def resume_line(name: str, run_id: str, done: int, asked: int, changes: list[str]) -> str:
    forced = " (run.resume=force)" if changes else ""
    return (f"resuming run {name} (MLflow run {run_id}) after {done} of {asked} epochs; "
            f"{_changed(changes)}{forced}")


def refusal_line(name: str, run_id: str, done: int, asked: int, changes: list[str]) -> str:
    return (f"run {name} (MLflow run {run_id}) stopped after {done} of {asked} epochs and "
            f"{_changed(changes)}; continuing it would mix two versions in one run: "
            f"run.fresh=true starts a new run, run.resume=force continues this one anyway")


def epochs_done(checkpoint: Path | None) -> int:
    """Whole epochs a run-directory checkpoint holds (0 without one; one written mid-epoch, on
    SIGTERM, holds the epochs before)."""
    import torch

    if checkpoint is None:
        return 0
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    whole = state.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress", {}).get("is_last_batch", True)
    return state["epoch"] + 1 if whole else state["epoch"]


def already_complete(checkpoint: Path | None, max_epochs: int) -> float | None:
    """The best monitored value, if this checkpoint already finished max_epochs (or early stopping
    ended it); else None."""
    import torch

    if checkpoint is None:
        return None
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    # Early stopping that fired is saved in the checkpoint (the checkpoints run after it).
    stopped = any(k.startswith("EarlyStopping") and s.get("stopped_epoch", 0) > 0
                  for k, s in state.get("callbacks", {}).items())
    if state["epoch"] + 1 < max_epochs and not stopped:  # "epoch": 0-based index of the last one trained
        return None
    if not state.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress", {}).get("is_last_batch", True):
        return None  # written mid-epoch (on SIGTERM): that epoch is not finished
    scores = [s["best_model_score"] for k, s in state.get("callbacks", {}).items()
              if k.startswith("ModelCheckpoint") and s.get("best_model_score") is not None]
    return float(scores[0]) if scores else None


def resume_point(cfg: DictConfig, run_dir: Path) -> Path | None:
    """ckpt_path, else the newest readable checkpoint of this run directory: last.ckpt, or
    best.ckpt when last.ckpt cannot be read (copied in part, a disk that failed), else none (from
    the start). An unreadable one is moved aside with a warning; the MLflow run stays the same."""
    if cfg.ckpt_path:
        path = Path(cfg.ckpt_path)
        if not path.is_file():
            raise ConfigError(f"ckpt_path {path} is not a file")
        return path
    folder = run_dir / "checkpoints"
    for partial in folder.glob(".*.partial"):  # a write a kill cut short; the checkpoint before it is whole
        partial.unlink(missing_ok=True)
    unreadable = []
    for name in ("last.ckpt", "best.ckpt"):
        path = folder / name
        if not path.is_file():
            continue
        epoch, problem = read_epoch(path)
        if problem is None:
            if unreadable:
                log.warning("%s; resuming from %s instead (after epoch %d), in the same MLflow run",
                            "; ".join(unreadable), name, epoch + 1)
            return path
        aside = path.with_name(f"{name}.unreadable")
        os.replace(path, aside)
        unreadable.append(f"{path} cannot be read ({problem}; kept as {aside.name})")
    if unreadable:
        log.warning("%s; training again from the first epoch, in the same MLflow run", "; ".join(unreadable))
    return None


def read_epoch(path: Path) -> tuple[int | None, str | None]:
    """A run-directory checkpoint's epoch index, or why it cannot be resumed from."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated: RuntimeError, EOFError, UnpicklingError ...
        reason = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
        return None, reason[:200]
    if not (isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping)
            and isinstance(state.get("epoch"), int) and "loops" in state):
        return None, "not a Lightning checkpoint"
    return state["epoch"], None


MAX_EPOCH = 2**31  # an epoch index beyond this is no training cnnlab did; Lightning stores it as given

# What a checkpoint Lightning's Trainer wrote holds besides the weights; a resume needs all of it.
TRAINER_KEYS = ("pytorch-lightning_version", "global_step", "loops", "optimizer_states")


def check_checkpoint(path: Path, plan: ModelPlan, model: Mapping[str, Any], max_epochs: int | None = None) -> None:
    """ckpt_path must be a Lightning checkpoint of this very network: a garbage file, another
    model's checkpoint, a bare state dict, extra or non-finite tensors or an impossible epoch would
    otherwise fail inside Lightning (or train on NaN weights), after the MLflow run exists."""
    import torch

    if not path.is_file():
        raise ConfigError(f"ckpt_path={path} does not exist or is not a file; give a .ckpt written "
                          f"by cnnlab train (runs/outputs/.../checkpoints/last.ckpt) or null")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises RuntimeError, UnpicklingError, EOFError ... here
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"ckpt_path={path} is not a readable checkpoint ({reason[:200]}); give a "
                          f".ckpt written by cnnlab train") from None
    resume = "cnnlab resumes from a .ckpt written by cnnlab train (weights, optimizer and loop state)"
    if isinstance(state, Mapping) and state and all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"ckpt_path={path} is a bare state dict ({len(state)} tensors such as "
                          f"{next(iter(state))}), not a training checkpoint; {resume}")
    if not (isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping)
            and "epoch" in state):
        raise ConfigError(f"ckpt_path={path} is not a Lightning checkpoint (no state_dict and "
                          f"epoch); give a .ckpt written by cnnlab train")
    with torch.device("meta"):  # shapes only: no memory, no weights read (a pretrained module's file)
        network = plan.build(pretrained=False)
    expected = {f"network.{k}": tuple(v.shape) for k, v in network.state_dict().items()}
    found = {k: tuple(v.shape) if hasattr(v, "shape") else None for k, v in state["state_dict"].items()}
    if found != expected:
        differs = sorted(k for k in expected.keys() | found.keys() if expected.get(k) != found.get(k))
        # A tensor both have, in another shape, says more than one the other network lacks.
        key = min(differs, key=lambda k: (k not in expected or k not in found, k))
        raise ConfigError(f"ckpt_path={path} holds another network: {key} is "
                          f"{list(found[key] or ()) if key in found else 'missing'} there but "
                          f"{list(expected[key]) if key in expected else 'absent'} in "
                          f"model {plan.name} ({len(differs)} tensor(s) differ); resume with "
                          f"the model config it was trained with")
    missing = [key for key in TRAINER_KEYS if key not in state]
    if missing:
        raise ConfigError(f"ckpt_path={path} holds weights but no {', '.join(missing)}: not a checkpoint "
                          f"Lightning's Trainer wrote; {resume}")
    epoch, step = state["epoch"], state["global_step"]
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < MAX_EPOCH for v in (epoch, step)):
        raise ConfigError(f"ckpt_path={path} says epoch {epoch!r}, step {step!r}: not a count of epochs "
                          f"and steps trained (integers in [0, 2**31)); {resume}")
    if max_epochs is not None and epoch + 1 > max_epochs:
        raise ConfigError(f"ckpt_path={path} has trained {epoch + 1} epochs, more than trainer.max_epochs="
                          f"{max_epochs}; set trainer.max_epochs to at least {epoch + 1} to continue it")
    for key, tensor in state["state_dict"].items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = "nan" if torch.isnan(tensor).any() else "inf"
            raise ConfigError(f"ckpt_path={path} holds non-finite weights ({bad} in {key}); training "
                              f"would only spread them: resume from an earlier checkpoint")
