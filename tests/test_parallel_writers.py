"""Many training processes writing to one embedded SQLite store at the same time."""

import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from cnnlab.training.artifacts import RUN_FILES

TINY = ["data=synthetic", "model.widths=[4]", "model.dense=[8]", "trainer.accelerator=cpu", "trainer.threads=1",
        "trainer.enable_progress_bar=false", "trainer.max_epochs=2", "tracking.experiment=writers"]
EPOCH_METRICS = ("train/loss", "train/acc", "val/loss", "val/acc", "val/acc_best", "time/epoch_s")


def _all_at_once(runs: Path, jobs: int) -> list[subprocess.CompletedProcess]:
    """`jobs` independent `cnnlab train` processes, all started before any ends."""
    started = [subprocess.Popen([sys.executable, "-m", "cnnlab.cli", "train", *TINY, f"paths.runs={runs}",
                                 f"seed={seed}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for seed in range(jobs)]
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=900), *p.communicate()) for p in started]


def _check_everything_arrived(runs: Path, jobs: int) -> None:
    client = MlflowClient(tracking_uri=f"sqlite:///{runs}/mlflow.db")
    (experiment,) = [e for e in client.search_experiments() if e.name == "writers"]  # created once
    found = client.search_runs([experiment.experiment_id], max_results=1000)
    assert sorted(int(r.data.params["seed"]) for r in found) == list(range(jobs))
    params = {len(r.data.params) for r in found}
    assert len(params) == 1 and params.pop() > 50  # every run has the full, same set of params
    for run in found:
        assert run.info.status == "FINISHED"
        for name in EPOCH_METRICS:  # each epoch exactly once
            assert [m.step for m in client.get_metric_history(run.info.run_id, name)] == [1, 2], name
        assert set(run.data.metrics) >= {"test/loss", "test/acc"}
        files = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert files >= {*RUN_FILES, "checkpoints", "hydra"}, files
        assert {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")} == {
            "checkpoints/best.ckpt", "checkpoints/last.ckpt"}


def _run(tmp_path: Path, jobs: int) -> None:
    done = _all_at_once(tmp_path, jobs)
    for job in done:
        assert job.returncode == 0, job.stderr[-2000:]
        assert "database is locked" not in job.stderr + job.stdout
    _check_everything_arrived(tmp_path, jobs)


def test_eight_parallel_writers_lose_nothing(tmp_path):
    _run(tmp_path, 8)


@pytest.mark.slow
def test_sixteen_parallel_writers_lose_nothing(tmp_path):
    _run(tmp_path, 16)
