"""The MLflow run lifecycle: where the store is, experiment and run creation, params, tags.

cnnlab creates the run itself (MlflowClient) and hands its id to Lightning's
MLFlowLogger, which then only logs epoch metrics. That keeps run naming,
nesting under a sweep's parent run, resuming the same run, and failure
status in one place.

A tracking server can go away while a job trains. Training never waits for it:
callbacks.EpochHistory keeps what it could not send on disk and sends it when
the server answers again. Calls that need the server to go on (after fitting:
test metrics, artifacts, the model, the final status) wait for it up to
`tracking.outage_wait_s`, then stop with TrackingUnavailable, leaving the run
as it was, so that the same command, run again, resumes it and sends the rest.
"""

from __future__ import annotations

import getpass
import logging
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

from cnnlab.errors import ConfigError, TrainingError

T = TypeVar("T")
log = logging.getLogger("cnnlab")

# MLflow refuses params longer than this; such values go to the config artifact instead.
MAX_PARAM_LENGTH = 6000
MAX_TAG_LENGTH = 8000
TOO_LONG = "(too long for an MLflow param: {n} characters; see the config.yaml artifact)"

# MLflow's own HTTP retries, bounded. Its defaults (7 retries with exponential backoff, 120 s
# per request) spend about 4 minutes on one call to a dead server, which would stall an epoch;
# cnnlab rides out outages itself (it keeps what it could not send), so 2 quick retries are
# enough: they cover a connection dropped by a server restart. Values a user exported win.
HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
            "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
SERVER_SCHEMES = ("http", "https")


class TrackingUnavailable(TrainingError):
    """The tracking server stayed away past tracking.outage_wait_s where the job needs it.

    Nothing is lost: epochs are in history.jsonl and last.ckpt, and the MLflow run is left
    as it was (not marked FAILED), so the same command, run again, resumes and sends the rest."""


def tracking_uri(uri: str | None, runs: Path) -> str:
    """The configured URI, or the embedded SQLite store under the runs root."""
    return uri if uri else f"sqlite:///{(runs / 'mlflow.db').resolve()}"


def check_tracking_config(tracking: Mapping[str, Any]) -> None:
    """The tracking group's values, checked before any work (`tracking=server` needs a URI)."""
    wait = tracking.get("outage_wait_s")
    if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not 0 <= wait < float("inf"):
        raise ConfigError(f"tracking.outage_wait_s must be a number of seconds >= 0, got {wait!r}")
    if not isinstance(tracking.get("require_server"), bool):
        raise ConfigError(f"tracking.require_server must be true or false, got {tracking.get('require_server')!r}")
    if not tracking.get("enabled") or not tracking["require_server"]:
        return
    uri = tracking.get("uri")
    if not uri:
        raise ConfigError("tracking=server needs the server's address: set tracking.uri=http://HOST:PORT "
                          "or the MLFLOW_TRACKING_URI environment variable")
    if urlparse(str(uri)).scheme not in SERVER_SCHEMES:
        raise ConfigError(f"tracking=server needs an http:// or https:// URI, got {uri!r} (from tracking.uri "
                          f"or MLFLOW_TRACKING_URI); for a local store use tracking=mlflow")


def bound_http_retries() -> None:
    """Cap MLflow's HTTP retries and timeout for this process (see HTTP_ENV)."""
    for name, value in HTTP_ENV.items():
        os.environ.setdefault(name, value)


def is_unreachable(error: BaseException) -> bool:
    """True when a tracking call failed because the server could not be reached (refused or
    dropped connection, timeout, retries exhausted on 5xx answers), not because it refused
    the request: MLflow wraps the transport error, so follow the chain of causes."""
    import requests

    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, requests.HTTPError):
            # An answer: a 4xx is the request's fault; only a 5xx means the server is not serving.
            return current.response is None or current.response.status_code >= 500
        if isinstance(current, requests.RequestException):
            return True
        current = current.__cause__ or current.__context__
    return False


def server_answers(uri: str, timeout_s: float) -> bool:
    """One /health request: does the server at `uri` serve now?"""
    import requests

    try:
        return requests.get(f"{uri.rstrip('/')}/health", timeout=timeout_s).ok
    except requests.RequestException:
        return False  # the caller's whole question: an error here is the answer "no"


def check_tracking(uri: str, timeout_s: float) -> None:
    """Fail within seconds, before training, when the store cannot be used."""
    parsed = urlparse(uri)
    if parsed.scheme in SERVER_SCHEMES:
        import requests

        bound_http_retries()
        try:
            requests.get(f"{uri.rstrip('/')}/health", timeout=timeout_s).raise_for_status()
        except requests.RequestException as error:
            raise ConfigError(f"the MLflow tracking server at {uri} did not answer within "
                              f"{timeout_s:g} s ({type(error).__name__}); start it, or use the "
                              f"embedded store (tracking=mlflow tracking.uri=null)") from None
    elif parsed.scheme == "sqlite":
        folder = Path(uri[len("sqlite:///"):]).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ConfigError(f"cannot create the MLflow store folder {folder}: "
                              f"{error.strerror}") from None
        create_sqlite_store(uri, folder)
    elif parsed.scheme not in ("file", "databricks", "postgresql", "mysql", "mssql", ""):
        raise ConfigError(f"tracking.uri scheme '{parsed.scheme}' is not one MLflow serves; use "
                          f"sqlite:///PATH, http://HOST:PORT or a database URI")


def create_sqlite_store(uri: str, folder: Path) -> None:
    """Open the SQLite store once under a file lock. MLflow creates (or upgrades) a store's
    schema when it first opens it; parallel jobs doing that at once on a new file corrupt the
    migration (seen with 8 jobs: alembic's CircularDependencyError), so only one does it."""
    from filelock import FileLock
    from mlflow.tracking import MlflowClient

    with FileLock(str(folder / ".mlflow-store.lock"), timeout=300):
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)


def with_retries(action: Callable[[], T], attempts: int = 8, delay_s: float = 0.25) -> T:
    """Retry SQLite's transient 'database is locked' (parallel sweep jobs share one file)."""
    from mlflow.exceptions import MlflowException

    for attempt in range(attempts - 1):
        try:
            return action()
        except MlflowException as error:
            if "database is locked" not in str(error):
                raise
            time.sleep(delay_s * (2 ** attempt))
    return action()  # the last try's error, if any, is the caller's


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'model': {'bn': True}} -> {'model.bn': True}; lists stay whole values."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


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


def _git(*args: str) -> str | None:
    result = subprocess.run(["git", *args], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent)
    return result.stdout.strip() if result.returncode == 0 else None


def provenance_tags() -> dict[str, str]:
    """Code version, environment and host: what a reader needs to trust a number."""
    import lightning
    import mlflow
    import torch

    import cnnlab
    from cnnlab.allocator import in_effect

    commit = _git("rev-parse", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "mlflow.source.git.commit": commit or "unknown (not a git checkout)",
        "git.dirty": "unknown" if dirty is None else str(bool(dirty)).lower(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "version.cnnlab": cnnlab.__version__,
        "version.torch": torch.__version__,
        "version.lightning": lightning.__version__,
        "version.mlflow": mlflow.__version__,
        "version.python": platform.python_version(),
        "host": socket.gethostname(),
        "mlflow.user": getpass.getuser(),
        "malloc": in_effect(),  # changes speed, not numbers
    }


def log_provenance(tracker: Tracker) -> None:
    """What a reader needs to rebuild the code and environment: the uncommitted diff, if any,
    and every installed package's version."""
    from importlib.metadata import distributions

    packages = sorted({f"{d.metadata['Name']}=={d.version}" for d in distributions()
                       if d.metadata["Name"]}, key=str.lower)
    tracker.log_text("\n".join(packages) + "\n", "provenance/requirements.txt")
    diff = _git("diff", "HEAD")
    if diff:
        tracker.log_text(diff + "\n", "provenance/git.diff")


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

    def mark_failed(self, error: BaseException, status: str = "FAILED") -> None:
        """Record why the job stopped and end the run with `status`, without waiting for a
        server that is away: then the run is left as it is (a rerun resumes it) and a warning
        says so, and the job's own error is what the caller raises."""
        if self.gave_up:
            log.warning("MLflow run %s is left open (the tracking server is away); the same command, "
                        "run again, resumes it", self.run_id)
            return
        try:
            self.set_tags({"error": f"{type(error).__name__}: {error}"}, patient=False)
            self.log_text(f"{type(error).__name__}: {error}\n", "error.txt", patient=False)
            self.finish(status, patient=False)
        except Exception as marking:
            if not is_unreachable(marking):
                raise
            log.warning("could not mark MLflow run %s %s: the tracking server %s is unreachable (%s)",
                        self.run_id, status, self.uri, root_cause(marking))

    def metric_history(self, key: str, patient: bool = True) -> list:
        return self._call(lambda: self.client.get_metric_history(self.run_id, key), f"reading {key}", patient)


def root_cause(error: BaseException) -> str:
    """The innermost cause's type and first line: enough to tell a refused connection from a timeout."""
    seen: set[int] = set()
    while id(error) not in seen:
        seen.add(id(error))
        inner = error.__cause__ or error.__context__
        if inner is None:
            break
        error = inner
    first = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {first[:200]}" if first else type(error).__name__
