"""tracking=server against a real `mlflow server`: a run and a sweep arrive through it, whole."""

import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient
from mlflow_server import MlflowServer, free_port

from cnnlab.config.compose import compose
from cnnlab.errors import ConfigError
from cnnlab.results.compare import compare
from cnnlab.train import train
from cnnlab.training.artifacts import read_history
from cnnlab.training.epoch_log import EPOCH_METRICS

TINY = ["data=synthetic", "model.widths=[4]", "model.dense=[8]", "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false"]


@pytest.fixture(scope="module")
def server(mlflow_server) -> MlflowServer:
    return mlflow_server


@pytest.fixture(scope="module")
def served_run(server, tmp_path_factory):
    """One 2-epoch run, model logged, through the server."""
    runs = tmp_path_factory.mktemp("runs")
    train(compose([*TINY, f"paths.runs={runs}", "trainer.max_epochs=2", "tracking=server",
                   f"tracking.uri={server.uri}", "tracking.experiment=served"]))
    client = MlflowClient(tracking_uri=server.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("served").experiment_id])
    return runs, client, run


def test_a_run_logs_params_tags_and_every_epoch_through_the_server(served_run):
    runs, client, run = served_run
    assert run.info.status == "FINISHED"
    assert run.data.params["model.layers_expanded"].startswith("conv:4:5:same")
    assert run.data.params["tracking.uri"].startswith("http://127.0.0.1:")
    assert run.data.tags["seed"] == "42" and run.data.tags["device"] == "cpu"
    rows = read_history(Path(run.data.tags["run_dir"]) / "history.jsonl")
    assert [row["epoch"] for row in rows] == [1, 2]
    for key in EPOCH_METRICS:
        assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)] == \
            [(row["epoch"], row[key]) for row in rows]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "test/acc")] == [2]
    # Nothing went to the embedded store.
    assert not (runs / "mlflow.db").exists() and not (runs / "mlartifacts").exists()


def test_artifacts_and_the_model_land_in_the_servers_artifact_store(served_run, server):
    _, client, run = served_run
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.artifact_location.startswith("mlflow-artifacts:")  # proxied by the server
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"summary.txt", "config.yaml", "curves.png", "history.jsonl", "checkpoints"} <= names
    ckpts = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
    assert ckpts == {"checkpoints/best.ckpt", "checkpoints/last.ckpt"}
    # The server is shared with other test files: this run's folder only.
    (stored,) = server.artifacts.rglob(f"{run.info.run_id}/artifacts/checkpoints/last.ckpt")
    local = Path(run.data.tags["run_dir"]) / "checkpoints" / "last.ckpt"
    assert stored.read_bytes() == local.read_bytes()
    assert list(server.artifacts.rglob("MLmodel")), "the logged model is not in the server's store"
    mlflow.set_tracking_uri(server.uri)
    model = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")
    probabilities = model(torch.rand(3, 3, 16, 16))
    assert probabilities.shape == (3, 4)
    torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(3))


def _sweep(runs: Path, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cnnlab.cli", "train", "-m", *TINY, f"paths.runs={runs}",
                           "trainer.max_epochs=1", "tracking.log_model=false", *overrides],
                          capture_output=True, text=True, env=env)


def test_a_sweep_nests_its_jobs_under_one_parent_on_the_server(server, tmp_path):
    # The URI from MLFLOW_TRACKING_URI this time; tracking=server reads it.
    env = {**os.environ, "MLFLOW_TRACKING_URI": server.uri}
    done = _sweep(tmp_path, "tracking=server", "tracking.experiment=served-sweep", "seed=0,1", env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(tracking_uri=server.uri)
    runs = client.search_runs([client.get_experiment_by_name("served-sweep").experiment_id])
    parents = [r for r in runs if r.data.tags.get("sweep") == "parent"]
    children = [r for r in runs if r.data.tags.get("sweep") != "parent"]
    assert len(parents) == 1 and len(children) == 2
    parent = parents[0]
    assert parent.info.status == "FINISHED" and all(c.info.status == "FINISHED" for c in children)
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert sorted(c.data.tags["knob.seed"] for c in children) == ["0", "1"]
    assert "compare/compare.md" in {a.path for a in client.list_artifacts(parent.info.run_id, "compare")}
    (row,) = compare(server.uri, parent=parent.info.run_id).table.to_dict("records")
    for metric in ("val/acc_best", "test/acc"):
        values = [c.data.metrics[metric] for c in children]
        assert row["n"] == 2 and row[f"{metric} mean"] == pytest.approx(sum(values) / 2)
        assert row[f"{metric} std"] == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5)
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlartifacts").exists()


def test_tracking_server_without_a_uri_fails_before_any_work(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ConfigError, match="tracking=server needs the server's address: set "
                                          "tracking.uri=http://HOST:PORT or the MLFLOW_TRACKING_URI"):
        train(compose([*TINY, f"paths.runs={tmp_path}", "tracking=server"]))
    with pytest.raises(ConfigError, match="needs an http:// or https:// URI, got 'sqlite:///x.db'"):
        train(compose([*TINY, f"paths.runs={tmp_path}", "tracking=server", "tracking.uri=sqlite:///x.db"]))
    with pytest.raises(ConfigError, match="tracking.outage_wait_s must be a number of seconds >= 0, got -1"):
        train(compose([*TINY, f"paths.runs={tmp_path}", "tracking.outage_wait_s=-1"]))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("uri, message", [
    (None, "error: tracking=server needs the server's address"),
    ("http://127.0.0.1:{port}",
     "error: the MLflow tracking server at http://127.0.0.1:{port} did not answer within 2 s"),
])
def test_a_sweep_without_a_reachable_server_stops_before_its_first_job(tmp_path, uri, message):
    port = free_port()  # nothing listens there
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    overrides = ["tracking=server", "tracking.timeout_s=2", "seed=0,1"]
    if uri:
        overrides.append(f"tracking.uri={uri.format(port=port)}")
    started = time.monotonic()
    done = _sweep(tmp_path, *overrides, env=env)
    assert done.returncode == 2, done.stderr[-3000:]
    assert message.format(port=port) in done.stderr
    assert time.monotonic() - started < 60  # interpreter start and imports, then seconds
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "multirun").exists()
