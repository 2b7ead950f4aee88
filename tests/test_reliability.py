"""Failure modes: a non-finite loss, object-injecting overrides, names that try to leave runs/."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from cnnlab.config.compose import compose
from cnnlab.errors import TrainingError
from cnnlab.train import train
from cnnlab.training.module import Classifier

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


def _train_command(runs: Path) -> list[str]:
    return [sys.executable, "-m", "cnnlab.cli", "train", *TINY, f"paths.runs={runs}", "trainer.max_epochs=4",
            "data.n_train=2048", "trainer.deterministic=true", "seed=5"]


def _final_weights(runs: Path) -> dict:
    (ckpt,) = runs.glob("outputs/*/*/checkpoints/last.ckpt")
    return torch.load(ckpt, weights_only=True)["state_dict"]


def test_killed_and_resumed_equals_uninterrupted(tmp_path):
    """SIGKILL during training, run the same command again: same final weights and metrics as a
    run that was never interrupted, one MLflow run, one value per epoch."""
    import os
    import signal
    import time

    whole = tmp_path / "whole"
    assert subprocess.run(_train_command(whole), capture_output=True).returncode == 0
    cut = tmp_path / "cut"
    job = subprocess.Popen(_train_command(cut), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    deadline = time.monotonic() + 120
    while not list(cut.glob("outputs/*/*/checkpoints/last.ckpt")) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # into the next epoch
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    assert job.returncode == -signal.SIGKILL, "training ended before the kill"
    again = subprocess.run(_train_command(cut), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    a, b = _final_weights(whole), _final_weights(cut)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    client = {name: MlflowClient(tracking_uri=f"sqlite:///{tmp_path / name}/mlflow.db") for name in ("whole", "cut")}
    runs = {name: c.search_runs([e.experiment_id for e in c.search_experiments()]) for name, c in client.items()}
    assert len(runs["cut"]) == 1 and runs["cut"][0].info.status == "FINISHED"
    history = {name: [(m.step, m.value) for m in client[name].get_metric_history(runs[name][0].info.run_id,
                                                                                 "val/loss")]
               for name in client}
    assert history["cut"] == history["whole"] and [s for s, _ in history["cut"]] == [1, 2, 3, 4]


def test_a_kill_after_the_last_checkpoint_still_logs_the_last_epoch(tmp_path, monkeypatch):
    """The narrowest window: the last epoch's checkpoint is on disk but its metrics are not yet in
    MLflow. Running again has nothing left to train and must still send that epoch."""
    from cnnlab.training.epoch_log import EpochHistory

    def killed(self, trainer, module):
        raise RuntimeError("killed")

    cfg = compose([*TINY, f"paths.runs={tmp_path}", "trainer.max_epochs=2"])
    with monkeypatch.context() as patch:
        patch.setattr(EpochHistory, "on_fit_end", killed)
        with pytest.raises(RuntimeError, match="killed"):
            train(cfg)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/loss")] == [1]
    train(cfg)
    (again,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/loss")] == [1, 2]


class _Payload:
    """Unpickling this runs a shell command: what a poisoned checkpoint file would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "epoch": 0, "payload": _Payload(marker)}, evil)
    done = subprocess.run([sys.executable, "-m", "cnnlab.cli", "train", *TINY, f"paths.runs={tmp_path / 'runs'}",
                           f"ckpt_path={evil}"], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.startswith("error: ") and "Traceback" not in done.stderr
    assert str(evil) in done.stderr
    assert not marker.exists()  # loaded with weights_only=True: the payload never ran
    assert not (tmp_path / "runs" / "mlflow.db").exists()
