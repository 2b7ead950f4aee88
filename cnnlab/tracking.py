"""The MLflow run lifecycle: where the store is, experiment and run creation, params, tags.

cnnlab creates the run itself (MlflowClient) and hands its id to Lightning's
MLFlowLogger, which then only logs epoch metrics. That keeps run naming,
nesting under a sweep's parent run, resuming the same run, and failure
status in one place.
"""

from __future__ import annotations

import getpass
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

from cnnlab.errors import ConfigError

T = TypeVar("T")

# MLflow refuses params longer than this; such values go to the config artifact instead.
MAX_PARAM_LENGTH = 6000
MAX_TAG_LENGTH = 8000
TOO_LONG = "(too long for an MLflow param: {n} characters; see the config.yaml artifact)"


def tracking_uri(uri: str | None, runs: Path) -> str:
    """The configured URI, or the embedded SQLite store under the runs root."""
    return uri if uri else f"sqlite:///{(runs / 'mlflow.db').resolve()}"


def check_tracking(uri: str, timeout_s: float) -> None:
    """Fail within seconds, before training, when the store cannot be used."""
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        import requests

        try:
            requests.get(f"{uri.rstrip('/')}/health", timeout=timeout_s).raise_for_status()
        except requests.RequestException as error:
            raise ConfigError(f"the MLflow tracking server at {uri} did not answer within "
                              f"{timeout_s:g} s ({type(error).__name__}); start it, or use the "
                              f"embedded store (tracking.uri=null)") from None
    elif parsed.scheme == "sqlite":
        folder = Path(uri[len("sqlite:///"):]).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ConfigError(f"cannot create the MLflow store folder {folder}: "
                              f"{error.strerror}") from None
    elif parsed.scheme not in ("file", "databricks", "postgresql", "mysql", "mssql", ""):
        raise ConfigError(f"tracking.uri scheme '{parsed.scheme}' is not one MLflow serves; use "
                          f"sqlite:///PATH, http://HOST:PORT or a database URI")


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
    """One MLflow run: create or resume it, log to it, close it with a status."""

    def __init__(self, uri: str, lock_dir: Path):
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        self.lock_path = lock_dir / ".mlflow-experiments.lock"
        self.run_id: str | None = None

    def experiment_id(self, name: str, artifact_location: str | None = None) -> str:
        """Get or create; a file lock stops parallel jobs racing to create the same one."""
        from filelock import FileLock

        with FileLock(str(self.lock_path), timeout=60):
            found = with_retries(lambda: self.client.get_experiment_by_name(name))
            if found is not None:
                if found.lifecycle_stage == "deleted":
                    raise ConfigError(f"MLflow experiment '{name}' is deleted; restore it or "
                                      f"choose another tracking.experiment")
                return found.experiment_id
            return with_retries(lambda: self.client.create_experiment(
                name, artifact_location=artifact_location))

    def start(self, experiment: str, run_name: str, tags: Mapping[str, str],
              artifact_location: str | None = None) -> str:
        experiment_id = self.experiment_id(experiment, artifact_location)
        run = with_retries(lambda: self.client.create_run(
            experiment_id, run_name=run_name, tags=dict(tags)))
        self.run_id = run.info.run_id
        return self.run_id

    def resume(self, run_id: str) -> bool:
        """Reopen an earlier run of this run directory; False if the store lost it."""
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            return False
        if run.info.lifecycle_stage == "deleted":
            return False
        self.run_id = run_id
        with_retries(lambda: self.client.update_run(run_id, status="RUNNING"))
        return True

    def run_status(self, run_id: str) -> str | None:
        """FINISHED, FAILED, RUNNING ...; None when the store does not have the run."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_run(run_id).info.status
        except MlflowException:
            return None

    def has_params(self) -> bool:
        return bool(self.client.get_run(self.run_id).data.params)

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, param_value(v)) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 per batch
            with_retries(lambda s=start: self.client.log_batch(
                self.run_id, params=items[s:s + 100], synchronous=True))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, tag_value(v)) for k, v in tags.items()]
        for start in range(0, len(items), 100):
            with_retries(lambda s=start: self.client.log_batch(
                self.run_id, tags=items[s:s + 100], synchronous=True))

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), folder)
        else:
            self.client.log_artifact(self.run_id, str(path), folder)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        items = [Metric(k, float(v), stamp, step) for k, v in metrics.items()]
        with_retries(lambda: self.client.log_batch(self.run_id, metrics=items, synchronous=True))

    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)

    def finish(self, status: str = "FINISHED") -> None:
        with_retries(lambda: self.client.set_terminated(self.run_id, status=status))

    def metric_history(self, key: str) -> list:
        return self.client.get_metric_history(self.run_id, key)
