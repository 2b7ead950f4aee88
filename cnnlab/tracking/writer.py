"""The one way in for writing to the tracking store: `Tracker`, one MLflow run that training
and sweeps create or resume, log to and close with a status.

A tracking server can go away while a job trains. Training never waits for it:
cnnlab.training.epoch_log keeps what it could not send on disk and sends it when
the server answers again. Calls that need the server to go on (after fitting:
test metrics, artifacts, the model, the final status) wait for it up to
`tracking.outage_wait_s`, then stop with TrackingUnavailable, leaving the run
as it was, so that the same command, run again, resumes it and sends the rest.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

from cnnlab.config.schema import SERVER_SCHEMES
from cnnlab.errors import ConfigError, TrainingError
from cnnlab.tracking.store import bound_http_retries, is_unreachable, root_cause, server_answers, with_retries

T = TypeVar("T")
log = logging.getLogger("cnnlab")

# MLflow refuses params longer than this; such values go to the config artifact instead.
MAX_PARAM_LENGTH = 6000
MAX_TAG_LENGTH = 8000
TOO_LONG = "(too long for an MLflow param: {n} characters; see the config.yaml artifact)"
STOP_TAGS = {"error", "signal"}  # set when a run stops early; a resumed run clears them (error.txt stays)


class TrackingUnavailable(TrainingError):
    """The tracking server stayed away past tracking.outage_wait_s where the job needs it.

    Nothing is lost: epochs are in history.jsonl and last.ckpt, and the MLflow run is left
    as it was (not marked FAILED), so the same command, run again, resumes and sends the rest."""


def tag_value(value: Any) -> str:
    """MLflow keeps at most 8,000 characters of a tag; a longer one says it was cut."""
    text = str(value)
    if len(text) <= MAX_TAG_LENGTH:
        return text
    note = f" ... (cut: {len(text)} characters in all)"
    return text[:MAX_TAG_LENGTH - len(note)] + note


def param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= MAX_PARAM_LENGTH else TOO_LONG.format(n=len(text))


class Tracker:
    """One MLflow run: create or resume it, log to it, close it with a status.

    With `outage_wait_s` set (training does), a call that finds the tracking server
    unreachable waits for it up to that many seconds, then raises TrackingUnavailable;
    without it (the default) the call's own error is raised at once.
    `patient=False` skips the wait: the caller keeps what it could not send.
    """

    def __init__(self, uri: str, lock_dir: Path, outage_wait_s: float | None = None, probe_timeout_s: float = 5.0):
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        self.lock_path = lock_dir / ".mlflow-experiments.lock"
        self.run_id: str | None = None
        self.outage_wait_s = outage_wait_s
        self.probe_timeout_s = probe_timeout_s
        self.gave_up = False  # set when a wait ran out: the server is gone for this process
        self.is_server = urlparse(uri).scheme in SERVER_SCHEMES
        if self.is_server:
            bound_http_retries()

    def reachable(self) -> bool:
        """Whether the store answers now (a quick /health request; local stores always do)."""
        return not self.is_server or server_answers(self.uri, self.probe_timeout_s)

    def patiently(self, action: Callable[[], T], what: str) -> T:
        """`action()`, waiting out an unreachable server up to outage_wait_s (see the class)."""
        deadline = None
        answered = False  # /health answered once already during this wait
        while True:
            try:
                return with_retries(action)
            except Exception as error:
                if self.outage_wait_s is None or not is_unreachable(error):
                    raise
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self.outage_wait_s
                    log.warning("tracking server %s unreachable while %s (%s); waiting up to %g s for it "
                                "(tracking.outage_wait_s)", self.uri, what, root_cause(error), self.outage_wait_s)
                # Past the deadline give up even if /health answers: a server that says it is
                # healthy but fails every call must not hold the job forever.
                if now >= deadline or not self._wait_until_reachable(deadline):
                    self.gave_up = True
                    raise TrackingUnavailable(
                        f"the MLflow tracking server at {self.uri} did not come back within "
                        f"{self.outage_wait_s:g} s (tracking.outage_wait_s) while {what}; nothing is lost: "
                        f"every epoch is in history.jsonl and the checkpoints, and MLflow run {self.run_id} "
                        f"is left open. Run the same command again when the server is back: it resumes "
                        f"and sends everything") from error
                if answered:  # it answers /health yet the call failed again: do not hammer it
                    time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
                else:
                    log.info("tracking server %s answers again; %s", self.uri, what)
                answered = True

    def _wait_until_reachable(self, deadline: float) -> bool:
        while not self.reachable():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(1.0, left))
        return True

    def _call(self, action: Callable[[], T], what: str, patient: bool = True) -> T:
        return self.patiently(action, what) if patient else with_retries(action)

    def experiment_id(self, name: str, artifact_location: str | None = None) -> str:
        """Get or create; a file lock stops parallel jobs racing to create the same one."""
        from filelock import FileLock

        with FileLock(str(self.lock_path), timeout=60):
            found = self._call(lambda: self.client.get_experiment_by_name(name), "finding the experiment")
            if found is not None:
                if found.lifecycle_stage == "deleted":
                    raise ConfigError(f"MLflow experiment '{name}' is deleted; restore it or "
                                      f"choose another tracking.experiment")
                return found.experiment_id
            return self._call(lambda: self.client.create_experiment(
                name, artifact_location=artifact_location), "creating the experiment")

    def start(self, experiment: str, run_name: str, tags: Mapping[str, str],
              artifact_location: str | None = None) -> str:
        experiment_id = self.experiment_id(experiment, artifact_location)
        # As strings: the SQL store converts a tag such as the seed itself, a server's REST API refuses it.
        tags = {k: tag_value(v) for k, v in tags.items()}
        run = self._call(lambda: self.client.create_run(experiment_id, run_name=run_name, tags=tags),
                         "creating the run")
        self.run_id = run.info.run_id
        return self.run_id

    def resume(self, run_id: str) -> bool:
        """Reopen an earlier run of this run directory; False if the store lost it."""
        from mlflow.exceptions import MlflowException

        try:
            run = self._call(lambda: self.client.get_run(run_id), "reading the run")
        except MlflowException as error:
            if is_unreachable(error):  # not lost, only out of reach: a new run would duplicate it
                raise
            return False
        if run.info.lifecycle_stage == "deleted":
            return False
        self.run_id = run_id
        self._call(lambda: self.client.update_run(run_id, status="RUNNING"), "reopening the run")
        for key in STOP_TAGS.intersection(run.data.tags):  # why it stopped last time: no longer true
            self._call(lambda key=key: self.client.delete_tag(run_id, key), f"clearing the tag {key}")
        return True

    def run_status(self, run_id: str) -> str | None:
        """FINISHED, FAILED, RUNNING ...; None when the store does not have the run."""
        from mlflow.exceptions import MlflowException

        try:
            return self._call(lambda: self.client.get_run(run_id), "reading the run").info.status
        except MlflowException as error:
            if is_unreachable(error):
                raise
            return None

    def has_params(self) -> bool:
        return bool(self._call(lambda: self.client.get_run(self.run_id), "reading the run").data.params)

    def run_metrics(self) -> dict[str, float]:
        """The run's metrics as the store holds them (each one's latest value)."""
        return dict(self._call(lambda: self.client.get_run(self.run_id), "reading the run").data.metrics)

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, param_value(v)) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 per batch
            self._call(lambda s=start: self.client.log_batch(
                self.run_id, params=items[s:s + 100], synchronous=True), "logging params")

    def set_tags(self, tags: Mapping[str, Any], patient: bool = True) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, tag_value(v)) for k, v in tags.items()]
        for start in range(0, len(items), 100):
            self._call(lambda s=start: self.client.log_batch(
                self.run_id, tags=items[s:s + 100], synchronous=True), "setting tags", patient)

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        if path.is_dir():
            self._call(lambda: self.client.log_artifacts(self.run_id, str(path), folder),
                       f"logging the artifacts {path.name}/")
        else:
            self._call(lambda: self.client.log_artifact(self.run_id, str(path), folder),
                       f"logging the artifact {path.name}")

    def log_metrics(self, metrics: Mapping[str, float], step: int, timestamp_ms: int | None = None,
                    patient: bool = True) -> None:
        """One value per metric at `step`. A given timestamp (of a value kept through an outage)
        makes a repeated send harmless: MLflow's SQL stores drop exact duplicates."""
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
        items = [Metric(k, float(v), stamp, step) for k, v in metrics.items()]
        self._call(lambda: self.client.log_batch(self.run_id, metrics=items, synchronous=True),
                   "logging metrics", patient)

    def log_text(self, text: str, name: str, patient: bool = True) -> None:
        self._call(lambda: self.client.log_text(self.run_id, text, name), f"logging {name}", patient)

    def finish(self, status: str = "FINISHED", patient: bool = True) -> None:
        self._call(lambda: self.client.set_terminated(self.run_id, status=status),
                   f"marking the run {status}", patient)

    def mark_failed(self, error: BaseException, status: str = "FAILED", tags: Mapping[str, str] | None = None) -> None:
        """Record why the job stopped and end the run with `status`, without waiting for a
        server that is away: then the run is left as it is (a rerun resumes it) and a warning
        says so, and the job's own error is what the caller raises."""
        if self.gave_up:
            log.warning("MLflow run %s is left open (the tracking server is away); the same command, "
                        "run again, resumes it", self.run_id)
            return
        try:
            self.set_tags({"error": f"{type(error).__name__}: {error}", **(tags or {})}, patient=False)
            self.log_text(f"{type(error).__name__}: {error}\n", "error.txt", patient=False)
            self.finish(status, patient=False)
        except Exception as marking:
            if not is_unreachable(marking):
                raise
            log.warning("could not mark MLflow run %s %s: the tracking server %s is unreachable (%s)",
                        self.run_id, status, self.uri, root_cause(marking))

    def metric_history(self, key: str, patient: bool = True) -> list:
        return self._call(lambda: self.client.get_metric_history(self.run_id, key), f"reading {key}", patient)


