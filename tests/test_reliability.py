"""Failure modes: a non-finite loss, object-injecting overrides, names that try to leave runs/."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from cnnlab.config import compose
from cnnlab.errors import TrainingError
from cnnlab.module import Classifier
from cnnlab.train import train

TINY = ["data=synthetic", "model.widths=[4]", "model.dense=[8]", "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false", "tracking.log_model=false"]


def test_a_nan_loss_stops_training_fails_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    loss = Classifier._loss

    def poisoned(self, logits, y):  # the second epoch's loss turns NaN
        value = loss(self, logits, y)
        return value * float("nan") if self.training and self.current_epoch >= 1 else value

    monkeypatch.setattr(Classifier, "_loss", poisoned)
    with pytest.raises(TrainingError, match="the training loss became nan in epoch 2; lower optim.lr"):
        train(compose([*TINY, f"paths.runs={tmp_path}", "trainer.max_epochs=3"]))
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FAILED" and "TrainingError" in run.data.tags["error"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1]
    last = Path(run.data.tags["run_dir"]) / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=True)
    assert state["epoch"] == 0  # the good first epoch
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())


@pytest.mark.parametrize("override", ["+hydra.callbacks.evil._target_=os.system",
                                      "+model._target_=builtins.exec", "hydra.launcher._target_=x.y"])
def test_overrides_that_would_import_objects_are_refused(tmp_path, override):
    done = subprocess.run([sys.executable, "-m", "cnnlab.cli", "train", *TINY, f"paths.runs={tmp_path}",
                           override], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.startswith(f"error: override '{override}' sets a Hydra instantiation key")
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("name", ["../../escaped", "/tmp/absolute-escape", ".."])
def test_experiment_and_run_names_stay_inside_the_runs_root(tmp_path, name):
    runs = tmp_path / "runs"
    train(compose([*TINY, f"paths.runs={runs}", "trainer.max_epochs=1", f"tracking.experiment={name}",
                   f"tracking.run_name={name}"]))
    client = MlflowClient(tracking_uri=f"sqlite:///{runs}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    run_dir = Path(run.data.tags["run_dir"]).resolve()
    assert runs.resolve() in run_dir.parents
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]  # nothing written beside it
    assert not Path("/tmp/absolute-escape").exists()
