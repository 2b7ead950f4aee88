"""Fixtures shared across test files: one real `mlflow server` for the whole session."""

import pytest
from mlflow_server import MlflowServer


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A running server (started once: ~5 s). Tests that stop it start it again before they end."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server")).start()
    yield server
    server.stop()
