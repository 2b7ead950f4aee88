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


def test_a_plain_reproduction_after_one_with_changes_compares_with_the_original(original):
    runs, run = original
    uri = f"sqlite:///{runs}/mlflow.db"
    changed = reproduce(uri, run.info.run_id, runs, ["seed=8"])
    plain = reproduce(uri, run.info.run_id, runs)
    assert plain.identical, plain.text()
    assert plain.new != changed.new
    assert MlflowClient(tracking_uri=uri).get_run(plain.new).data.params["seed"] == "7"
    # the history is compared epoch by epoch, not only the final values
    assert any(key.startswith("val/loss epoch") for key, *_ in plain.verdicts)


def test_two_originals_with_one_name_and_config_each_reproduce(tmp_path):
    uri = f"sqlite:///{tmp_path}/store/mlflow.db"
    for root in ("a", "b"):
        train(compose([*TINY, f"paths.runs={tmp_path / root}", f"tracking.uri={uri}"]))
    client = MlflowClient(tracking_uri=uri)
    ids = [r.info.run_id for r in client.search_runs([e.experiment_id for e in client.search_experiments()])]
    assert len(ids) == 2 and len({client.get_run(i).info.run_name for i in ids}) == 1
    results = [reproduce(uri, run_id, tmp_path / "c") for run_id in ids]
    assert all(r.identical for r in results) and results[0].new != results[1].new


def test_a_metric_missing_on_one_side_is_a_difference():
    from cnnlab.results.reproduce import verdict

    assert verdict(float("nan"), 0.5, 1.0).startswith("DIFFERS")
    assert verdict(0.5, float("nan"), 1.0).startswith("DIFFERS")
    assert verdict(0.5, 0.5 + 1e-9, 0.0) == "DIFFERS" and verdict(0.5, 0.505, 0.01) == "within tolerance"


def test_off_the_cpu_the_tolerance_comes_from_the_seed_spread_or_is_relative(tmp_path):
    import statistics

    from cnnlab.results.reproduce import tolerances
    from cnnlab.tracking.reader import Reader

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    eid = client.create_experiment("spread")
    accs = [0.50, 0.54, 0.57]
    ids = []
    for seed, acc in enumerate(accs):
        run = client.create_run(eid).info.run_id
        client.log_param(run, "seed", str(seed))
        client.log_param(run, "model.kernels", "[5]")
        client.log_metric(run, "val/acc", acc)
        client.log_metric(run, "val/loss", 1.0 + seed)
        client.set_terminated(run)
        ids.append(run)
    reader = Reader(uri)
    limits, how = tolerances(reader, reader.run(ids[0]), on_cpu=False, given=None)
    assert limits["val/acc"] == pytest.approx(0.5 * statistics.stdev(accs)) and "seed-to-seed" in how
    lone = client.create_run(client.create_experiment("lone")).info.run_id
    client.log_metric(lone, "val/acc", 0.6)
    client.log_metric(lone, "val/loss", 1.5)
    limits, _ = tolerances(reader, reader.run(lone), on_cpu=False, given=None)
    assert limits["val/acc"] == pytest.approx(0.006) and limits["val/loss"] == pytest.approx(0.03)
    assert tolerances(reader, reader.run(lone), on_cpu=True, given=None)[0]["val/acc"] == 0


def test_the_threads_the_machine_chose_are_used_again(tmp_path, monkeypatch):
    """trainer.threads=null takes fewer threads on a busy machine (cnnlab.training.cpu_share), and on
    the CPU the thread count changes the rounding: reproduce trains with the original's threads."""
    import torch

    from cnnlab.training import cpu_share

    quick = [a for a in TINY if a != "trainer.deterministic=true"]  # deterministic runs keep the default
    monkeypatch.setattr(cpu_share, "others_busy_cores", lambda since: 0.0)  # quiet: torch's default
    train(compose([*quick, f"paths.runs={tmp_path}"]))
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.data.tags["torch.threads"] == str(torch.get_num_threads())
    monkeypatch.setattr(cpu_share, "others_busy_cores", lambda since: 64.0)  # busy: 1 thread unless told
    result = reproduce(f"sqlite:///{tmp_path}/mlflow.db", run.info.run_id, tmp_path)
    new = client.get_run(result.new)
    assert new.data.tags["torch.threads"] == run.data.tags["torch.threads"]
    assert not any("torch threads" in w for w in result.warnings)
    assert result.identical, result.text()
