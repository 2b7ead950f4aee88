"""`cnnlab reproduce`: the logged config trains again to identical metrics on CPU."""

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from cnnlab.cli import main as cli
from cnnlab.config.compose import compose
from cnnlab.errors import ConfigError
from cnnlab.results.reproduce import reproduce
from cnnlab.train import train

TINY = ["data=synthetic", "model.widths=[4]", "model.dense=[8]", "trainer.max_epochs=2",
        "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "tracking.log_model=false",
        "trainer.deterministic=true", "seed=7"]


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    train(compose([*TINY, f"paths.runs={runs}"]))
    client = MlflowClient(tracking_uri=f"sqlite:///{runs}/mlflow.db")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return runs, run


def test_reproduction_is_identical_and_linked(original):
    runs, run = original
    result = reproduce(f"sqlite:///{runs}/mlflow.db", run.info.run_id, runs)
    assert result.identical, result.text()
    assert [v[0] for v in result.verdicts][:2] == ["train/loss", "train/acc"]
    assert all(a == b for _, a, b, _ in result.verdicts)
    assert not any("data fingerprint" in w or "code version" in w for w in result.warnings)
    new = MlflowClient(tracking_uri=f"sqlite:///{runs}/mlflow.db").get_run(result.new)
    assert new.data.tags["reproduces"] == run.info.run_id and new.info.run_id != run.info.run_id
    assert new.data.tags["config.hash"] == run.data.tags["config.hash"]


def test_changed_data_fingerprint_is_warned(original, capsys):
    runs, run = original
    code = cli(["reproduce", "--runs", str(runs), run.info.run_id, "data.noise=0.9"])
    out = capsys.readouterr().out
    assert "warning: data fingerprint differs" in out
    assert code == 1 and "DIFFERS" in out  # other data, other numbers: exit 1 says so


def test_provenance_artifacts_and_tags(original):
    runs, run = original
    client = MlflowClient(tracking_uri=f"sqlite:///{runs}/mlflow.db")
    files = {a.path for a in client.list_artifacts(run.info.run_id, "provenance")}
    assert "provenance/requirements.txt" in files
    requirements = Path(client.download_artifacts(run.info.run_id, "provenance/requirements.txt"))
    assert any(line.startswith("torch==") for line in requirements.read_text().splitlines())
    assert len(run.data.tags["config.hash"]) == 16
    assert run.data.tags["data.fingerprint"] == run.data.params["data.fingerprint"]
    if run.data.tags["git.dirty"] == "true":
        assert "provenance/git.diff" in files


def test_bad_run_ids_are_clear(original, tmp_path):
    runs, _ = original
    with pytest.raises(ConfigError, match="no MLflow run 'deadbeef'"):
        reproduce(f"sqlite:///{runs}/mlflow.db", "deadbeef", tmp_path)
    client = MlflowClient(tracking_uri=f"sqlite:///{runs}/mlflow.db")
    bare = client.create_run(client.create_experiment("bare")).info.run_id
    with pytest.raises(ConfigError, match="has no logged config"):
        reproduce(f"sqlite:///{runs}/mlflow.db", bare, tmp_path)
