"""Issue #15's acceptance: a resnet sweep over BN on/off and 3 seeds, and compare's params and MACs
columns for its variants."""

import subprocess
import sys

import pytest
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from cnnlab.config.compose import compose
from cnnlab.model.plan import model_plan
from cnnlab.results.compare import compare

RESNET = ["model=resnet", "model.depth=20", "data=synthetic"]


def _plan(bn: bool):
    return model_plan(compose([*RESNET, f"model.bn={str(bn).lower()}"]))


def test_compare_shows_params_and_macs_of_each_resnet_variant(tmp_path, monkeypatch):
    """The params a run logs (cnnlab.training.run) for both variants, as compare reads them. A file
    store: creating a SQLite store's tables costs seconds, and what is under test is compare."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("resnet")
    plans = {bn: _plan(bn) for bn in (True, False)}
    for bn, plan in plans.items():
        for seed in range(3):
            run = client.create_run(experiment)
            client.log_batch(run.info.run_id, params=[
                Param("seed", str(seed)), Param("model.bn", str(bn)),
                Param("model.total_params", str(plan.total_params)), Param("model.macs", str(plan.macs)),
                Param("model.receptive_field", str(plan.receptive_field)),
                Param("model.layers_expanded", plan.description)],
                metrics=[Metric("val/acc_best", 0.5 + seed / 10, 0, 0), Metric("test/acc", 0.5, 0, 0),
                         Metric("time/epoch_s", 1.0, 0, 0)], tags=[RunTag("seed", str(seed))])
            client.set_terminated(run.info.run_id)
    table = compare(uri, experiment="resnet").table.set_index("variant")
    on, off = table.loc["bn=True"], table.loc["bn=False"]
    # BN on: 3x3 convs without biases, gamma/beta (+ moving mean/var) per conv; off: a bias per conv.
    assert on["params"] == plans[True].total_params and off["params"] == plans[False].total_params
    widths = [16] + [16] * 6 + [32] * 6 + [64] * 6  # the stem and the 18 convs of ResNet-20
    assert on["params"] - off["params"] == 4 * sum(widths) - sum(widths)
    assert on["MACs"] == off["MACs"] == plans[True].macs
    assert on["n"] == off["n"] == 3


@pytest.mark.slow
def test_resnet_sweep_over_bn_and_seeds_makes_six_children_and_compares(tmp_path):
    done = subprocess.run([sys.executable, "-m", "cnnlab.cli", "train", "-m", *RESNET, "model.bn=true,false",
                           "seed=0,1,2", "trainer.max_epochs=1", "data.n_train=64", "data.n_test=32",
                           "trainer.accelerator=cpu", "tracking.log_model=false", f"paths.runs={tmp_path}"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    children = [r for r in runs if r.data.tags.get("sweep") != "parent"]
    assert len(children) == 6 and all(r.info.status == "FINISHED" for r in children)
    (parent,) = [r for r in runs if r.data.tags.get("sweep") == "parent"]
    table = compare(f"sqlite:///{tmp_path}/mlflow.db", parent=parent.info.run_id).table.set_index("variant")
    assert sorted(table.index) == ["bn=False", "bn=True"]
    for bn in (True, False):
        row, plan = table.loc[f"bn={bn}"], _plan(bn)
        assert (row["params"], row["MACs"], row["n"]) == (plan.total_params, plan.macs, 3)
