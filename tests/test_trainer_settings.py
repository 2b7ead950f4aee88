"""The everyday trainer switches (#15): early stopping, the learning rate per epoch, gradient
accumulation and clipping, and the trainer=debug preset, each on a tiny synthetic run."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from cnnlab.config.compose import compose, container
from cnnlab.config.schema import check_config
from cnnlab.errors import ConfigError
from cnnlab.train import train

TINY = ["data=synthetic", "model=baseline", "model.widths=[4]", "model.dense=[8]", "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false", "tracking.log_model=false", "seed=3"]


def _cfg(runs: Path, *extra: str):
    return compose([*TINY, f"paths.runs={runs}", *extra])


def _run(runs: Path):
    client = MlflowClient(tracking_uri=f"sqlite:///{runs.resolve()}/mlflow.db")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return client, run


def _history(runs: Path) -> list[dict]:
    (path,) = (runs / "outputs").rglob("history.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _global_step(runs: Path) -> int:
    (path,) = (runs / "outputs").rglob("last.ckpt")
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


def test_the_learning_rate_of_every_epoch_is_logged(tmp_path):
    train(_cfg(tmp_path, "trainer.max_epochs=2", "optim.lr=0.01", "optim.schedule=step", "optim.step_size=1",
               "optim.gamma=0.5"))
    assert [row["train/lr"] for row in _history(tmp_path)] == pytest.approx([0.01, 0.005])
    client, run = _run(tmp_path)
    logged = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/lr"))
    assert logged == [(1, pytest.approx(0.01)), (2, pytest.approx(0.005))]


def test_early_stopping_stops_and_tags_the_epoch(tmp_path):
    # No change counts as an improvement with this min_delta: epoch 1 sets the best, epoch 2 waits, stop.
    train(_cfg(tmp_path, "trainer.max_epochs=5", "early_stopping.patience=1", "early_stopping.min_delta=1e9"))
    assert [row["epoch"] for row in _history(tmp_path)] == [1, 2]
    _, run = _run(tmp_path)
    assert run.info.status == "FINISHED"
    assert run.data.tags["early_stopping.stopped_epoch"] == "2"
    # The same command again: the run is done (it stopped early), nothing more is trained.
    train(_cfg(tmp_path, "trainer.max_epochs=5", "early_stopping.patience=1", "early_stopping.min_delta=1e9"))
    assert [row["epoch"] for row in _history(tmp_path)] == [1, 2]
    client, again = _run(tmp_path)
    assert again.info.run_id == run.info.run_id


def test_early_stopping_off_trains_every_epoch_and_sets_no_tag(tmp_path):
    train(_cfg(tmp_path, "trainer.max_epochs=2", "trainer.limit_train_batches=2"))
    assert [row["epoch"] for row in _history(tmp_path)] == [1, 2]
    _, run = _run(tmp_path)
    assert "early_stopping.stopped_epoch" not in run.data.tags


def test_accumulating_two_batches_halves_the_optimizer_steps(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    train(_cfg(one, "trainer.max_epochs=1", "tracking=none"))
    train(_cfg(two, "trainer.max_epochs=1", "tracking=none", "trainer.accumulate_grad_batches=2",
               "trainer.gradient_clip_val=0.5", "trainer.gradient_clip_algorithm=value"))
    assert _global_step(one) == 8  # 256 synthetic images in batches of 32
    assert _global_step(two) == 4


def test_the_debug_preset_trains_in_seconds(tmp_path):
    cfg = compose(["trainer=debug", "tracking=none", *TINY[:4], f"paths.runs={tmp_path}"])
    assert cfg.trainer.max_epochs == 1 and cfg.trainer.limit_train_batches == 2
    assert cfg.trainer.enable_progress_bar is False and cfg.trainer.accelerator == "auto"
    started = time.monotonic()
    train(cfg)
    assert time.monotonic() - started < 60
    assert [row["epoch"] for row in _history(tmp_path)] == [1]
    assert _global_step(tmp_path) == 2
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("override, message", [
    ("early_stopping.patience=0", "early_stopping.patience must be null or an integer >= 1 (epochs), got 0"),
    ("early_stopping.monitor=loss", "early_stopping.monitor must be one of train/loss"),
    ("early_stopping.mode=up", "early_stopping.mode must be one of min, max, got 'up'"),
    ("early_stopping.min_delta=-1", "early_stopping.min_delta must be a finite number in [0, inf), got -1"),
    ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches must be an integer >= 1, got 0"),
    ("trainer.gradient_clip_algorithm=l3", "trainer.gradient_clip_algorithm must be one of norm, value, got 'l3'"),
])
def test_the_schema_names_the_allowed_values(override, message):
    with pytest.raises(ConfigError) as error:
        check_config(container(compose(["data=synthetic", override])))
    assert message in str(error.value)
