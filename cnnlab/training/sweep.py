"""Hydra multirun <-> MLflow: one parent run per sweep, every job a child of it.

Lightning's MLFlowLogger cannot nest runs, so cnnlab does it itself: this
Hydra callback (registered in conf/train.yaml) opens the parent run before
any job starts and writes its id into the sweep directory; each job, in
whatever process the launcher gives it, reads the id and tags its own run
with `mlflow.parentRunId`. When the sweep ends, the comparison table and
plots are logged to the parent.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("cnnlab")

PARENT_FILE = "mlflow_parent_run_id"  # the sweep running now
PARENTS_FILE = "mlflow_parent_runs.json"  # sweep command -> its parent run, for relaunches
# The parent run this process opened for the sweep running now: Hydra calls no end-of-sweep hook
# when a signal stops the sweep, so the command line closes it (close_interrupted_sweep).
_open_parent: dict[str, Any] = {}


def swept_keys(config: DictConfig) -> dict[str, str]:
    """The sweep's overrides that vary (`model.kernels=[5],[3,3]` -> {'model.kernels': '[5],[3,3]'})."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    varying = {o.get_key_element(): o.input_line.split("=", 1)[1]
               for o in parsed if o.is_sweep_override()}
    params = OmegaConf.to_container(config.hydra.sweeper, resolve=False).get("params") or {}
    varying.update({str(k): str(v) for k, v in params.items()})
    return varying


def parent_run_id(sweep_dir: Path) -> str | None:
    """The parent run of the sweep running now in this folder (jobs read it)."""
    path = sweep_dir / PARENT_FILE
    return path.read_text().strip() if path.is_file() else None


def sweep_key(config: DictConfig) -> str:
    """The sweep command's task overrides, sorted: equal for a relaunch of the same sweep."""
    return " ".join(sorted(config.hydra.overrides.task)) or "(no overrides)"


def _parents(sweep_dir: Path) -> dict[str, str]:
    path = sweep_dir / PARENTS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _tracker(config: DictConfig):
    from cnnlab.config.schema import TRACKING
    from cnnlab.tracking.store import check_tracking, tracking_uri
    from cnnlab.tracking.writer import Tracker

    # tracking=server without a URI must stop the sweep, not open its parent in the embedded store.
    TRACKING.check(OmegaConf.to_container(config.tracking, resolve=True))
    runs = Path(config.paths.runs).resolve()
    uri = tracking_uri(config.tracking.uri, runs)
    check_tracking(uri, config.tracking.timeout_s)
    return Tracker(uri, runs), runs


class MlflowSweep(Callback):
    """Opens the sweep's parent run and closes it with the comparison attached."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Hydra turns a callback's exceptions into warnings and launches the jobs anyway;
        # a cluster or a store that cannot be reached must stop the sweep before any job starts
        # (the cluster first: no parent run is left behind for a sweep that never ran).
        from cnnlab.errors import ConfigError, fail
        from cnnlab.training.launchers import check_launcher

        try:
            check_launcher(config)
            self._open_parent(config)
        except ConfigError as error:
            sys.exit(fail(error))

    def _open_parent(self, config: DictConfig) -> None:
        if not config.tracking.enabled:
            return
        from cnnlab.errors import ConfigError
        from cnnlab.tracking.provenance import provenance_tags
        from cnnlab.tracking.store import artifact_location

        tracker, runs = _tracker(config)
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if config.tracking.parent:  # a round of `cnnlab ablate`: its jobs join the ablation's parent
            if not tracker.resume(config.tracking.parent):
                raise ConfigError(f"tracking.parent={config.tracking.parent} is not a run in {tracker.uri}")
            (sweep_dir / PARENT_FILE).write_text(config.tracking.parent)
            return
        key = sweep_key(config)
        known = _parents(sweep_dir)
        if key in known and not config.run.fresh and tracker.resume(known[key]):
            # The same sweep command again: its finished jobs are skipped, unfinished ones
            # resume from their checkpoints, all under the parent they had.
            (sweep_dir / PARENT_FILE).write_text(known[key])
            _open_parent.update(uri=tracker.uri, runs=runs, run_id=known[key])
            log.info("sweep continues its MLflow parent run %s", known[key])
            return
        varying = swept_keys(config)
        launcher = OmegaConf.select(config, "hydra.launcher._target_") or "?"
        sweeper = OmegaConf.select(config, "hydra.sweeper._target_") or "?"
        artifacts = artifact_location(tracker.uri, runs, config.tracking.experiment)
        tracker.start(config.tracking.experiment, "sweep " + " ".join(
            f"{k}={v}" for k, v in varying.items()), artifact_location=artifacts, tags={
            **provenance_tags(), "sweep": "parent", "sweep.keys": ",".join(varying),
            "sweep.launcher": launcher.rsplit(".", 1)[-1], "sweep.sweeper": sweeper.rsplit(".", 1)[-1],
            "sweep.dir": str(sweep_dir)})
        tracker.log_params({"sweep.overrides": " ".join(config.hydra.overrides.task),
                            "sweep.launcher": launcher, "sweep.sweeper": sweeper,
                            **{f"sweep.grid.{k}": v for k, v in varying.items()}})
        (sweep_dir / PARENT_FILE).write_text(tracker.run_id)
        write_atomic(sweep_dir / PARENTS_FILE, json.dumps({**known, key: tracker.run_id}, indent=1))
        _open_parent.update(uri=tracker.uri, runs=runs, run_id=tracker.run_id)
        log.info("sweep parent MLflow run %s", tracker.run_id)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        _open_parent.clear()
        if not config.tracking.enabled or config.tracking.parent:  # a parent given is closed by its owner
            return
        from cnnlab.results.compare import compare, write_outputs

        tracker, _ = _tracker(config)
        sweep_dir = Path(config.hydra.sweep.dir)
        run_id = parent_run_id(sweep_dir)
        if run_id is None or not tracker.resume(run_id):
            log.error("the sweep's parent run is missing from %s; nothing to attach", sweep_dir)
            return
        try:
            result = compare(tracker.uri, parent=run_id)
            out = sweep_dir / "compare"
            write_outputs(result, out, tracker.uri)
            tracker.log_artifact(out, "compare")
            print(result.text(), file=sys.stderr)
        except BaseException:
            tracker.finish("FAILED")
            raise
        tracker.finish("FINISHED")


def close_interrupted_sweep(error: BaseException, argv: list[str]) -> str | None:
    """After a signal stopped a sweep (`error`, an Interrupted): mark its parent run KILLED with a
    `signal` tag (the job that was running marked its own run), and return what to add to the
    error line: the command that resumes the sweep. None when no sweep was running."""
    import shlex
    import signal

    from cnnlab.tracking.writer import Tracker

    if not _open_parent:
        return None
    opened = dict(_open_parent)
    _open_parent.clear()
    tracker = Tracker(opened["uri"], opened["runs"])
    tracker.run_id = opened["run_id"]
    tracker.mark_failed(error, "KILLED", tags={"signal": signal.Signals(error.signum).name})
    command = shlex.join(["cnnlab", "train", *argv])
    return (f"the sweep's MLflow parent run {opened['run_id']} is marked KILLED; the same command resumes the "
            f"sweep (finished jobs are skipped): {command}")
