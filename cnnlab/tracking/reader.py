"""The one way in for reading the tracking store: compare, report, reproduce and audit.

Every question the results ask of MLflow goes through `Reader`, so a new backend (another
store, a cache) is a change here and in cnnlab.tracking.store, not in each command. Runs come
back as MLflow's own `Run` objects (`.info`, `.data.params/.tags/.metrics`).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cnnlab.errors import ConfigError

# search_runs' page: enough for any sweep cnnlab runs, in one request.
MAX_RUNS = 50_000


class Reader:
    """Read-only access to one tracking store (`uri` as cnnlab.tracking.store.tracking_uri gives it)."""

    def __init__(self, uri: str):
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)

    def run(self, run_id: str) -> Any:
        """The run, or a ConfigError naming the id and the store."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_run(run_id)
        except MlflowException:
            raise ConfigError(f"no MLflow run '{run_id}' in {self.uri}") from None

    def experiment_id(self, name: str) -> str:
        """The experiment's id, or a ConfigError listing the experiments there are."""
        found = self.client.get_experiment_by_name(name or "")
        if found is None:
            names = sorted(e.name for e in self.client.search_experiments())
            raise ConfigError(f"no MLflow experiment '{name}' in {self.uri}; experiments: "
                              f"{', '.join(names) or '(none)'}")
        return found.experiment_id

    def experiment_name(self, experiment_id: str) -> str:
        return self.client.get_experiment(experiment_id).name

    def search(self, experiment_ids: Iterable[str], filter_string: str = "",
               order_by: list[str] | None = None, max_results: int = MAX_RUNS) -> list:
        return list(self.client.search_runs(list(experiment_ids), filter_string=filter_string,
                                            order_by=order_by, max_results=max_results))

    def children(self, parent: Any) -> list:
        """A sweep parent run's child runs."""
        return self.search([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")

    def metric_history(self, run_id: str, key: str) -> list[float]:
        """A metric's values in step order (for cnnlab: per epoch, 1-based)."""
        return [m.value for m in sorted(self.client.get_metric_history(run_id, key), key=lambda m: m.step)]

    def artifact_names(self, run_id: str, folder: str | None = None) -> set[str]:
        return {a.path for a in self.client.list_artifacts(run_id, folder)}

    def read_text(self, run_id: str, path: str) -> str:
        return Path(self.client.download_artifacts(run_id, path)).read_text()

    def attach(self, run_id: str, path: Path, folder: str) -> None:
        """Add a file that describes a finished run (a report) to it; never its metrics."""
        self.client.log_artifact(run_id, str(path), folder)
