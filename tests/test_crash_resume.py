"""Kill training with SIGKILL at random moments, a dozen times, and resume each time."""

import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

# A dense layer of 4M weights makes each checkpoint (weights + Adam's moments) about 50 MB, so
# its write lasts long enough to be caught in the middle. cnnlab writes it to `.last.ckpt.partial`
# beside it and renames that into place (cnnlab.training.trainer.durable_checkpoint_io), so a
# kill while that file exists is a kill inside the write.
COMMAND = ["data=synthetic", "model.widths=[16]", "model.dense=[4096]", "data.n_train=2048", "seed=7",
           "trainer.accelerator=cpu", "trainer.deterministic=true", "trainer.max_epochs=16", "trainer.threads=1",
           "trainer.enable_progress_bar=false", "tracking.log_model=false"]
KILLS = 12
EPOCHS = 16  # each "random" kill comes after one more epoch (7 of them): most of the run is left after


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
        time.sleep(0.001)
    return False


def _history(runs: Path) -> list[tuple[int, float]]:
    client = MlflowClient(tracking_uri=f"sqlite:///{runs}/mlflow.db")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED"
    return [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val/loss")]


def _written_since(paths, since: float) -> bool:
    """Whether any of these files was written after `since` (a time.time()): by the job running now."""
    for path in paths:
        try:
            if path.stat().st_mtime > since:
                return True
        except FileNotFoundError:  # renamed away between the listing and the stat
            continue
    return False


@pytest.mark.slow
def test_a_dozen_random_kills_including_checkpoint_writes_change_nothing(tmp_path):
    whole = tmp_path / "whole"
    assert subprocess.run(_command(whole), capture_output=True).returncode == 0
    epoch_s = statistics.median(json.loads(line)["seconds"]
                                for line in next(whole.glob("outputs/*/*/history.jsonl")).read_text().splitlines())
    cut = tmp_path / "cut"
    env = dict(os.environ)
    rng = random.Random(2026)
    moments = {"start-up": 0, "checkpoint write": 0, "random": 0}
    mid_write, epochs = 0, []  # kills that left a half-written file; epochs done at each kill
    while sum(moments.values()) < KILLS:
        started = time.time()
        job = subprocess.Popen(_command(cut), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                               start_new_session=True)
        kills = sum(moments.values())
        if kills == 0:  # while it imports, loads data, opens the MLflow run
            at = time.monotonic() + rng.uniform(0.5, 3.0)
            kind, ready = "start-up", lambda at=at: time.monotonic() >= at
        elif kills % 3 == 1:  # while a checkpoint is half written
            kind = "checkpoint write"

            def ready(started=started):
                return _written_since(_checkpoints(cut).glob(".*.partial"), started)
        else:  # once it has trained one more epoch, at a random point of the next one: training,
            # validation, the checkpoint or the MLflow logging (progress by machine speed, not clock)
            delay = rng.uniform(0.0, 0.9 * epoch_s)
            state = {"at": None}

            def ready(delay=delay, state=state, started=started):
                if state["at"] is None and _written_since(cut.glob("outputs/*/*/history.jsonl"), started):
                    state["at"] = time.monotonic() + delay
                return state["at"] is not None and time.monotonic() >= state["at"]
            kind = "random"
        if not _kill_when(job, ready, deadline_s=300):
            pytest.fail(f"training finished after {moments} kills; make the run longer")
        moments[kind] += 1
        if kind == "checkpoint write" and _written_since(_checkpoints(cut).glob(".*.partial"), started):
            mid_write += 1  # the partial file outlived the process: it died inside the write
        last = _checkpoints(cut) / "last.ckpt"
        # Never truncated: the checkpoint a rerun resumes from loads, safely, every time.
        epochs.append(torch.load(last, weights_only=True)["epoch"] + 1 if last.exists() else 0)
    assert moments["checkpoint write"] >= 4 and mid_write >= 3
    assert len(set(epochs)) >= 5  # the kills are spread over the run, not all in one place
    done = subprocess.run(_command(cut), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    ckpt = {name: torch.load(_checkpoints(runs) / "last.ckpt", weights_only=True)["state_dict"]
            for name, runs in (("whole", whole), ("cut", cut))}
    assert all(torch.equal(ckpt["whole"][k], ckpt["cut"][k]) for k in ckpt["whole"])
    history = _history(cut)
    assert [s for s, _ in history] == list(range(1, EPOCHS + 1))  # no step twice, none missing
    assert history == _history(whole)
    print(json.dumps({"kills": moments, "inside a checkpoint write": mid_write, "epochs done at each kill": epochs}))
