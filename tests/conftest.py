"""Fixtures shared across test files: one real `mlflow server` for the whole session, and a
Hydra that never leaks from one test into the next."""

import pytest
from hydra.core.hydra_config import HydraConfig
from mlflow_server import MlflowServer


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A running server (started once: ~5 s). Tests that stop it start it again before they end."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server")).start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def no_hydra_app_left_over():
    """A test that runs `cnnlab train` in this process (its --help, a bad input) leaves Hydra's
    app config set; a later train(cfg) would then take itself for a Hydra job."""
    yield
    HydraConfig.instance().cfg = None
