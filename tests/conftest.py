"""Fixtures shared across test files: one real `mlflow server` for the whole session, a
Hydra that never leaks from one test into the next, and a decode cache of the session's own."""

import os

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


@pytest.fixture(scope="session", autouse=True)
def own_decode_cache(tmp_path_factory):
    """paths.cache defaults to the user's cache folder ($XDG_CACHE_HOME/cnnlab): point it at
    the session's own, for this process and the `cnnlab` processes the tests start."""
    before = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield
    if before is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = before
