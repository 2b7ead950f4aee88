"""Kill training with SIGKILL at random moments, a dozen times, and resume each time."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

# A dense layer of 2M weights makes each checkpoint (weights + Adam's moments) about 24 MB, so
# its write lasts long enough to be caught in the middle.
COMMAND = ["data=synthetic", "model.widths=[16]", "model.dense=[2048]", "data.n_train=2048", "seed=7",
           "trainer.accelerator=cpu", "trainer.deterministic=true", "trainer.max_epochs=8", "trainer.threads=1",
           "trainer.enable_progress_bar=false", "tracking.log_model=false"]
KILLS = 12


def _command(runs: Path) -> list[str]:
    return [sys.executable, "-m", "cnnlab.cli", "train", *COMMAND, f"paths.runs={runs}"]


def _checkpoints(runs: Path) -> Path:
    return next(iter(runs.glob("outputs/*/*/checkpoints")), runs / "none")


def _kill_when(job: subprocess.Popen, ready, deadline_s: float) -> bool:
    """SIGKILL the job's process group once `ready()` holds; False if the job ended first."""
    deadline = time.monotonic() + deadline_s
    while job.poll() is None and time.monotonic() < deadline:
        if ready():
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
            return True
        time.sleep(0.002)
    return False


def _history(runs: Path) -> list[tuple[int, float]]:
    client = MlflowClient(tracking_uri=f"sqlite:///{runs}/mlflow.db")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED"
    return [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val/loss")]


@pytest.mark.slow
def test_a_dozen_random_kills_including_checkpoint_writes_change_nothing(tmp_path):
    whole = tmp_path / "whole"
    assert subprocess.run(_command(whole), capture_output=True).returncode == 0
    cut = tmp_path / "cut"
    rng = random.Random(2026)
    moments = {"checkpoint write": 0, "random": 0}
    mid_write, epochs = 0, []  # kills that left a half-written file; epochs done at each kill
    while sum(moments.values()) < KILLS:
        job = subprocess.Popen(_command(cut), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
        if sum(moments.values()) % 3 == 0:  # every third kill: while a checkpoint is half written
            kind, ready = "checkpoint write", lambda: any(_checkpoints(cut).glob("*.partial"))
        else:  # anywhere: start-up, an epoch, validation, logging
            at = time.monotonic() + rng.uniform(4.0, 16.0)
            kind, ready = "random", lambda at=at: time.monotonic() >= at
        if not _kill_when(job, ready, deadline_s=120):
            pytest.fail(f"training finished after {moments} kills; make the run longer")
        moments[kind] += 1
        if kind == "checkpoint write" and any(_checkpoints(cut).glob("*.partial")):
            mid_write += 1  # the temporary file outlived the process: it died inside the write
        last = _checkpoints(cut) / "last.ckpt"
        # Never truncated: the checkpoint a rerun resumes from loads, safely, every time.
        epochs.append(torch.load(last, weights_only=True)["epoch"] + 1 if last.exists() else 0)
    assert moments["checkpoint write"] >= 4 and mid_write >= 3
    assert len(set(epochs)) >= 2  # the kills are spread over the run, not all in one place
    done = subprocess.run(_command(cut), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    ckpt = {name: torch.load(_checkpoints(runs) / "last.ckpt", weights_only=True)["state_dict"]
            for name, runs in (("whole", whole), ("cut", cut))}
    assert all(torch.equal(ckpt["whole"][k], ckpt["cut"][k]) for k in ckpt["whole"])
    history = _history(cut)
    assert [s for s, _ in history] == list(range(1, 9))  # no step twice, none missing
    assert history == _history(whole)
    print(json.dumps({"kills": moments, "inside a checkpoint write": mid_write, "epochs done at each kill": epochs}))
