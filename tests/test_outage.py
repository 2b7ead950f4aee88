"""A tracking server that goes away while a job trains: training goes on, nothing is lost or doubled.

The server is a real `mlflow server` (tests/mlflow_server.py), stopped and started again on
the same port and store while `cnnlab train` runs in a subprocess; the bookkeeping itself is
also checked against a switchable stand-in, without a server.
"""

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from cnnlab.config.compose import compose
from cnnlab.tracking.writer import Tracker, TrackingUnavailable
from cnnlab.train import train
from cnnlab.training.artifacts import read_history, write_history
from cnnlab.training.epoch_log import EPOCH_KEY, EPOCH_METRICS, PENDING_FILE, EpochHistory

TINY = ["data=synthetic", "model.widths=[4]", "model.dense=[8]", "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false", "tracking.log_model=false"]
STEPS_PER_EPOCH = 8  # 256 synthetic images, batch 32
STEP_EVERY = 3

# `cnnlab train` with every epoch lasting at least PACE_S more: the tests stop the server at an
# epoch boundary and need it to stay away across later ones, whatever the machine's speed.
PACED = """
import os, sys, time
from cnnlab.training.epoch_log import EpochHistory
end = EpochHistory.on_train_epoch_end
def paced(self, trainer, module):
    end(self, trainer, module)
    time.sleep(float(os.environ["PACE_S"]))
EpochHistory.on_train_epoch_end = paced
from cnnlab.cli import main
sys.exit(main(["train", *sys.argv[1:]]))
"""


def _rows(runs: Path) -> list[dict]:
    found = list(runs.glob("outputs/*/*/history.jsonl"))
    return read_history(found[0]) if found else []


def _wait_for_rows(runs: Path, count: int, job: subprocess.Popen, timeout_s: float = 300) -> int:
    deadline = time.monotonic() + timeout_s
    while len(_rows(runs)) < count:
        assert job.poll() is None, f"training ended with {job.returncode} before epoch {count}"
        assert time.monotonic() < deadline, f"no epoch {count} within {timeout_s} s"
        time.sleep(0.05)
    return len(_rows(runs))


def _check_everything_arrived_once(server, runs: Path, experiment: str, epochs: int) -> str:
    """Every epoch's metrics exactly once, equal to history.jsonl; every step metric once."""
    client = MlflowClient(tracking_uri=server.uri)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert run.info.status == "FINISHED"
    rows = _rows(runs)
    assert [row["epoch"] for row in rows] == list(range(1, epochs + 1))
    for key in EPOCH_METRICS:
        logged = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
        assert sorted(logged) == [(row["epoch"], row[key]) for row in rows], key
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, EPOCH_KEY)) == list(range(1, epochs + 1))
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss_step"))
    assert steps == list(range(STEP_EVERY, epochs * STEPS_PER_EPOCH + 1, STEP_EVERY))
    assert [m.step for m in client.get_metric_history(run.info.run_id, "test/acc")] == [epochs]
    assert not list(runs.glob(f"outputs/*/*/{PENDING_FILE}"))  # everything kept was sent
    return run.info.run_id


def _outage(server, tmp_path: Path, epochs: int, stop_after: int, down_s: float, pace_s: float) -> dict:
    """Train in a subprocess; stop the server once `stop_after` epochs are written, keep it away
    at least `down_s` and across at least one epoch boundary, start it again."""
    runs = tmp_path / "runs"
    experiment = tmp_path.name
    command = [sys.executable, "-c", PACED, *TINY, f"paths.runs={runs}", "tracking=server",
               f"tracking.uri={server.uri}", f"tracking.experiment={experiment}", f"trainer.max_epochs={epochs}",
               "tracking.step_metrics=true", f"tracking.step_every={STEP_EVERY}", "tracking.outage_wait_s=120"]
    log = open(tmp_path / "train.log", "w")
    job = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PACE_S": str(pace_s)})
    try:
        at_stop = _wait_for_rows(runs, stop_after, job)
        server.stop()
        stopped = time.monotonic()
        _wait_for_rows(runs, at_stop + 1, job)  # an epoch boundary passes while the server is away
        time.sleep(max(0.0, down_s - (time.monotonic() - stopped)))
        at_restart = len(_rows(runs))
        server.start()
        down = time.monotonic() - stopped
        assert job.wait(timeout=600) == 0, (tmp_path / "train.log").read_text()[-4000:]
    finally:
        if job.poll() is None:
            job.kill()
        log.close()
        if not server.healthy():
            server.start()
    output = (tmp_path / "train.log").read_text()
    run_id = _check_everything_arrived_once(server, runs, experiment, epochs)
    return {"output": output, "at_stop": at_stop, "at_restart": at_restart, "down_s": down, "run_id": run_id}


def test_training_goes_on_through_a_short_outage_and_loses_nothing(mlflow_server, tmp_path):
    result = _outage(mlflow_server, tmp_path, epochs=16, stop_after=2, down_s=2, pace_s=0.5)
    assert result["at_restart"] > result["at_stop"]  # the job trained on while the server was away
    assert result["output"].count("unreachable") == 1  # one warning, not one per call
    assert "epoch(s) kept in history.jsonl, step metrics in mlflow_pending.jsonl, sent when it returns" \
        in result["output"]
    assert "is back after" in result["output"]


@pytest.mark.slow
def test_a_30_s_outage_mid_training_loses_nothing(mlflow_server, tmp_path):
    """The issue's case: the server stopped for 30 s in the middle of training, then started again."""
    result = _outage(mlflow_server, tmp_path, epochs=90, stop_after=3, down_s=30, pace_s=0.5)
    rows = _rows(tmp_path / "runs")
    assert result["down_s"] >= 30 and result["at_restart"] > result["at_stop"]
    assert result["at_restart"] < len(rows), "training had ended before the server came back"
    assert result["output"].count("unreachable") == 1
    print(f"server stopped {result['down_s']:.0f} s after epoch {result['at_stop']} of {len(rows)}, back "
          f"after epoch {result['at_restart']}: every metric once, run FINISHED")


def test_a_server_away_too_long_stops_cleanly_and_the_same_command_resumes(mlflow_server, tmp_path, monkeypatch):
    """Past tracking.outage_wait_s the job stops with a clear error, the run left open; run again,
    it trains nothing twice and sends every kept epoch and step metric exactly once."""
    runs = tmp_path / "runs"
    cfg = compose([*TINY, f"paths.runs={runs}", "tracking=server", f"tracking.uri={mlflow_server.uri}",
                   "tracking.experiment=away", "trainer.max_epochs=2", "tracking.outage_wait_s=1",
                   "tracking.step_metrics=true", f"tracking.step_every={STEP_EVERY}"])
    start_epoch = EpochHistory.on_train_epoch_start

    def server_goes(self, trainer, module):  # before epoch 2: epoch 1 is not sent yet
        if trainer.current_epoch == 1:
            mlflow_server.stop()
        start_epoch(self, trainer, module)

    try:
        with monkeypatch.context() as patch:
            patch.setattr(EpochHistory, "on_train_epoch_start", server_goes)
            with pytest.raises(TrackingUnavailable, match=r"did not come back within 1 s \(tracking.outage_wait_s\) "
                               r"while sending the epochs' metrics.*Run the same command again"):
                train(cfg)
        (pending,) = runs.glob(f"outputs/*/*/{PENDING_FILE}")
        assert len(read_history(pending)) > 0  # epoch 2's step metrics, kept on disk
    finally:
        mlflow_server.start()
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("away").experiment_id])
    assert run.info.status == "RUNNING"  # left open for the rerun, not FAILED
    assert client.get_metric_history(run.info.run_id, EPOCH_KEY) == []  # epoch 1 was to go at epoch 2's start
    train(cfg)  # the same command, the server back
    assert _check_everything_arrived_once(mlflow_server, runs, "away", 2) == run.info.run_id


def _refused() -> MlflowException:
    """What MLflow raises for a dead server: its own exception, the transport error as context."""
    error = MlflowException("API request to http://127.0.0.1:1/api failed with exception ...")
    error.__context__ = requests.ConnectionError("[Errno 111] Connection refused")
    return error


class Switchable:
    """A real (SQLite) tracker behind a switch: while `down`, calls fail as a dead server's do."""

    def __init__(self, tracker: Tracker):
        self.tracker, self.uri, self.down, self.calls = tracker, "http://switchable", False, 0

    def reachable(self) -> bool:
        return not self.down

    def _through(self, action):
        self.calls += 1
        if self.down:
            raise _refused()
        return action()

    def log_metrics(self, *args, **kwargs):
        return self._through(lambda: self.tracker.log_metrics(*args, **kwargs))

    def metric_history(self, *args, **kwargs):
        return self._through(lambda: self.tracker.metric_history(*args, **kwargs))


def test_kept_values_go_once_and_in_full_when_the_server_returns(tmp_path, caplog):
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", tmp_path)
    tracker.start("switch", "r", tags={})
    server = Switchable(tracker)
    history = EpochHistory(tmp_path / "history.jsonl", server, step_every=5)
    rows = [{"epoch": e, "seconds": 0.5, "train/loss": 1.0 / e, "val/loss": 2.0 / e} for e in (1, 2, 3)]
    write_history(rows[:2], history.path)
    history.flush(up_to=2)
    server.down = True
    write_history(rows, history.path)
    with caplog.at_level(logging.WARNING, logger="cnnlab"):
        history.log_or_keep({"train/loss_step": 0.25}, step=20, up_to=2)  # fails: kept, one warning
        calls = server.calls
        history.flush(up_to=3)  # asks /health only: still away
        history.log_or_keep({"train/loss_step": 0.125}, step=25, up_to=3)  # kept without a call
    assert server.calls == calls
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "unreachable" in warning and "1 epoch(s) kept in history.jsonl" in warning
    kept = read_history(history.pending)
    assert [(e["step"], e["metrics"]) for e in kept] == [(20, {"train/loss_step": 0.25}),
                                                         (25, {"train/loss_step": 0.125})]
    with open(history.pending, "a") as out:  # a process killed in the middle of keeping a value
        out.write('\n{"step": 30, "timest')
    history.log_or_keep({"train/loss_step": 0.0625}, step=35, up_to=3)  # kept on a line of its own
    kept.append(json.loads(history.pending.read_text().splitlines()[-1]))
    server.down = False
    with caplog.at_level(logging.WARNING, logger="cnnlab"):
        history.flush(up_to=3)
    assert "skipping a line cut short when its process was killed" in caplog.text
    history.flush(up_to=3)  # nothing left: nothing sent twice
    assert not history.pending.exists()
    steps = [(m.step, m.value, m.timestamp) for m in tracker.metric_history("train/loss_step")]
    assert sorted(steps) == [(20, 0.25, kept[0]["timestamp"]), (25, 0.125, kept[1]["timestamp"]),
                             (35, 0.0625, kept[2]["timestamp"])]
    assert sorted((m.step, m.value) for m in tracker.metric_history("val/loss")) == [(1, 2.0), (2, 1.0), (3, 2 / 3)]
    assert sorted(m.step for m in tracker.metric_history(EPOCH_KEY)) == [1, 2, 3]


def test_a_failed_job_on_an_unreachable_server_warns_and_keeps_its_own_error(tmp_path, caplog):
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", tmp_path)
    tracker.start("mark", "r", tags={})

    class Dead:
        def __getattr__(self, name):
            def call(*args, **kwargs):
                raise _refused()
            return call

    tracker.client = Dead()
    with caplog.at_level(logging.WARNING, logger="cnnlab"):
        tracker.mark_failed(RuntimeError("boom"))  # does not raise: the job's RuntimeError is what counts
    assert f"could not mark MLflow run {tracker.run_id} FAILED: the tracking server" in caplog.text
    tracker.outage_wait_s = 0
    with pytest.raises(TrackingUnavailable, match="did not come back within 0 s"):
        tracker.finish()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cnnlab"):
        tracker.mark_failed(RuntimeError("boom"))  # gave up already: no call, the run left open
    assert f"MLflow run {tracker.run_id} is left open" in caplog.text
