"""Where a run is seen in the MLflow UI: the command that serves the dashboard on a store, and the
run's address in it."""

from __future__ import annotations

from urllib.parse import urlparse

from cnnlab.tracking.store import SERVER_SCHEMES, is_embedded, sqlite_path

UI_ADDRESS = "http://127.0.0.1:5000"  # where `mlflow ui` listens unless told otherwise


def dashboard(uri: str, experiment_id: str, run_id: str) -> tuple[str | None, str]:
    """(the command to start the dashboard, or None for a server that is one; the run's URL)."""
    page = f"#/experiments/{experiment_id}/runs/{run_id}"
    if urlparse(uri).scheme in SERVER_SCHEMES:
        return None, f"{uri.rstrip('/')}/{page}"
    store = f"sqlite:///{sqlite_path(uri).resolve()}" if is_embedded(uri) else _without_password(uri)
    return f"mlflow ui --backend-store-uri {store}", f"{UI_ADDRESS}/{page}"


def _without_password(uri: str) -> str:
    """A database URI as it can be printed: a password in it becomes `***` (type it in yourself)."""
    parts = urlparse(uri)
    if parts.password is None:
        return uri
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)).geturl()
