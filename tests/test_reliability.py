"""Failure modes: a non-finite loss, object-injecting overrides, names that try to leave runs/."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from log_handlers import handlers_restored
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


def _cnnlab(*args: str, cwd: Path | None = None, **popen) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cnnlab.cli", "train", *TINY, *args], capture_output=True,
                          text=True, cwd=cwd, **popen)


def test_env_set_cannot_make_git_run_a_command(tmp_path):
    """hydra.job.env_set's GIT_CONFIG_* once made cnnlab's own `git status` (provenance tags) run
    a command: core.fsmonitor names a program git starts. Refused before anything is written."""
    marker = tmp_path / "pwned"
    done = _cnnlab(f"paths.runs={tmp_path / 'runs'}", "trainer.max_epochs=1", "+hydra.job.env_set.GIT_CONFIG_COUNT=1",
                   "+hydra.job.env_set.GIT_CONFIG_KEY_0=core.fsmonitor",
                   f"+hydra.job.env_set.GIT_CONFIG_VALUE_0='touch {marker}; false'")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]  # one line
    assert "environment variable GIT_CONFIG_COUNT" in done.stderr
    assert not marker.exists() and not (tmp_path / "runs").exists()


def test_provenance_git_ignores_the_git_variables_of_the_environment(tmp_path, monkeypatch):
    """Whatever the job's environment holds (a launcher's, a cluster's), cnnlab's git calls run with
    no GIT_* variable, core.fsmonitor off and no hooks."""
    from cnnlab.tracking.provenance import log_provenance, provenance_tags

    marker = tmp_path / "pwned"
    for name, value in {"GIT_CONFIG_COUNT": "2", "GIT_CONFIG_KEY_0": "core.fsmonitor",
                        "GIT_CONFIG_VALUE_0": f"touch {marker}; false", "GIT_CONFIG_KEY_1": "diff.external",
                        "GIT_CONFIG_VALUE_1": f"touch {marker}"}.items():
        monkeypatch.setenv(name, value)

    class Texts:
        def log_text(self, text, name):
            pass

    tags = provenance_tags()
    log_provenance(Texts())
    assert len(tags["mlflow.source.git.commit"]) == 40 and tags["git.dirty"] in ("true", "false")
    assert not marker.exists()


@pytest.mark.parametrize("override", [
    "+hydra.callbacks.x={_target_:builtins.open,file:MARKER,mode:w}",
    "hydra={callbacks:{x:{_target_:builtins.open,file:MARKER,mode:w}}}",
    "+model.extra={_target_:builtins.open,file:MARKER,mode:w}",
    "+hydra.job_logging.handlers.x={class:logging.FileHandler,filename:MARKER}",
])
def test_objects_in_an_override_value_are_refused_and_never_made(tmp_path, override, capsys, monkeypatch):
    """The guard once looked only at keys: `_target_` inside a dict value got through, and Hydra
    opened the file (for writing) as a 'callback'."""
    from cnnlab.cli import main

    marker = tmp_path / "pwned"
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    code = main(["train", *TINY, f"paths.runs={tmp_path / 'runs'}", override.replace("MARKER", str(marker))])
    assert code == 2 and capsys.readouterr().err.startswith("error: override ")
    assert not marker.exists() and not (tmp_path / "runs").exists()


def test_chdir_and_the_default_experiment_write_nothing_outside_paths_runs(tmp_path, monkeypatch):
    """hydra.job.chdir=true with a relative paths.runs nested the store inside the job's output folder
    (runs/outputs/<job>/runs/mlflow.db); MLflow's "Default" experiment kept its artifacts in
    ./mlruns of the working folder. One command with both: everything lands in <cwd>/runs."""
    import os

    from cnnlab.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    with handlers_restored():  # Hydra's app adds log handlers for its job: put them back
        code = main(["train", *TINY, "paths.runs=runs", "trainer.max_epochs=1", "hydra.job.chdir=true",
                     "tracking.experiment=Default", "data.n_train=64", "data.n_test=32"])
    assert code == 0 and Path.cwd() == tmp_path
    assert os.listdir(tmp_path) == ["runs"]
    assert not [p for p in tmp_path.rglob("*") if p.name in ("mlruns", "runs") and p != tmp_path / "runs"]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/runs/mlflow.db")
    (run,) = client.search_runs(["0"])  # the Default experiment
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith((tmp_path / "runs" / "mlartifacts").as_uri())
    assert Path(run.data.tags["run_dir"]).is_relative_to(tmp_path / "runs")


def test_the_command_line_may_set_thread_counts_and_gpus_in_env_set():
    from cnnlab.training.checks import refuse_object_overrides

    refuse_object_overrides(["+hydra.job.env_set.OMP_NUM_THREADS=2", "+hydra.job.env_set.MKL_NUM_THREADS=2",
                             "+hydra.job.env_set.CUDA_VISIBLE_DEVICES='0,1'", "hydra.job.env_set={}",
                             "tracking.run_name=my_target_run", "hydra/launcher=joblib"])


@pytest.mark.parametrize("name", ["team/study/x", "...", "a..b/c"])
def test_experiment_and_run_names_stay_inside_the_runs_root(tmp_path, name):
    """Names that read as paths ('../x', '/tmp/x', '..') are refused (tests/test_bad_inputs.py);
    the slashes and dots that remain still never take a folder out of paths.runs."""
    runs = tmp_path / "runs"
    train(compose([*TINY, f"paths.runs={runs}", "trainer.max_epochs=1", f"tracking.experiment={name}",
                   f"tracking.run_name={name}"]))
    client = MlflowClient(tracking_uri=f"sqlite:///{runs}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    run_dir = Path(run.data.tags["run_dir"]).resolve()
    assert runs.resolve() in run_dir.parents
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]  # nothing written beside it
    assert not Path("/tmp/absolute-escape").exists()


def test_two_experiment_names_never_share_a_run_directory(tmp_path):
    """`a/b` and `a_b` were both the folder `a_b`: the second command found the first's finished
    run there and trained nothing. A name the slug changes now gets a short hash of itself."""
    import re

    from cnnlab.config.compose import slug

    names = ["a/b", "a_b", "a:b", "a b", "a\nb", "../a_b", ".a_b", "", "x" * 200, "x" * 201, "é" * 5000]
    slugs = [slug(name) for name in names]
    assert len(set(slugs)) == len(names)
    assert all(re.fullmatch(r"[A-Za-z0-9_=,+-][A-Za-z0-9._=,+-]{0,119}", s) for s in slugs), slugs
    assert slugs[:2] == [f"a_b-{slugs[0][-8:]}", "a_b"]  # readable: the name, then the hash

    runs = tmp_path / "runs"
    for name in ("a/b", "a_b"):
        train(compose([*TINY, f"paths.runs={runs}", "trainer.max_epochs=1", f"tracking.experiment={name}"]))
    client = MlflowClient(tracking_uri=f"sqlite:///{runs}/mlflow.db")
    found = {name: client.search_runs([client.get_experiment_by_name(name).experiment_id]) for name in ("a/b", "a_b")}
    assert [len(found[name]) for name in found] == [1, 1]
    assert found["a/b"][0].data.tags["run_dir"] != found["a_b"][0].data.tags["run_dir"]


def _train_command(runs: Path) -> list[str]:
    return [sys.executable, "-m", "cnnlab.cli", "train", *TINY, f"paths.runs={runs}", "trainer.max_epochs=4",
            "data.n_train=2048", "trainer.deterministic=true", "seed=5"]


def _final_weights(runs: Path) -> dict:
    (ckpt,) = runs.glob("outputs/*/*/checkpoints/last.ckpt")
    return torch.load(ckpt, weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """_train_command's run, never interrupted: what every interrupted and resumed one must equal."""
    whole = tmp_path_factory.mktemp("whole")
    done = subprocess.run(_train_command(whole), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return whole


def _metric_history(runs: Path, key: str = "val/loss") -> list[tuple[int, float]]:
    client, run = _only_run(runs)
    return [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]


def test_killed_and_resumed_equals_uninterrupted(tmp_path, uninterrupted):
    """SIGKILL during training, run the same command again: same final weights and metrics as a
    run that was never interrupted, one MLflow run, one value per epoch."""
    import os
    import signal
    import time

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
    a, b = _final_weights(uninterrupted), _final_weights(cut)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    _, run = _only_run(cut)
    assert run.info.status == "FINISHED"
    assert _metric_history(cut) == _metric_history(uninterrupted)
    assert [s for s, _ in _metric_history(cut)] == [1, 2, 3, 4]


def _signal_mid_epoch(runs: Path, signum: int, uninterrupted: Path) -> tuple[int, str]:
    """Start _train_command, send `signum` in the middle of its second epoch, return its exit
    status and stderr."""
    import json
    import statistics
    import time

    rows = (uninterrupted / "outputs").glob("*/*/history.jsonl")
    epoch_s = statistics.median(json.loads(line)["seconds"] for line in next(rows).read_text().splitlines())
    job = subprocess.Popen(_train_command(runs), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(runs.glob("outputs/*/*/checkpoints/last.ckpt")) and job.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.01)
    time.sleep(0.4 * epoch_s)  # the first epoch's checkpoint is written: into the second's batches
    job.send_signal(signum)
    err = job.communicate(timeout=120)[1]
    assert "Traceback" not in err, err[-3000:]
    return job.returncode, err.strip().splitlines()[-1]


def test_sigterm_mid_epoch_in_this_process_resumes_exactly(tmp_path, monkeypatch):
    """The fast version of the next test: SIGTERM sent to this process after batch 3 of 8 of
    epoch 2 (in-process train(), no subprocess start-ups)."""
    import os
    import signal

    from cnnlab.errors import Interrupted

    cfg = [*TINY, "trainer.max_epochs=2", "data.n_train=256", "trainer.deterministic=true", "seed=5"]
    train(compose([*cfg, f"paths.runs={tmp_path / 'whole'}"]))

    def stop(self, outputs, batch, batch_idx):
        if self.current_epoch == 1 and batch_idx == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    with monkeypatch.context() as patch:
        patch.setattr(Classifier, "on_train_batch_end", stop, raising=False)
        with pytest.raises(Interrupted, match="stopped by SIGTERM; the MLflow run is marked KILLED; a checkpoint "
                                              "was written after batch 3 of 8 of epoch 2") as stopped:
            train(compose([*cfg, f"paths.runs={tmp_path / 'cut'}"]))
    assert stopped.value.signum == signal.SIGTERM
    _, run = _only_run(tmp_path / "cut")
    assert run.info.status == "KILLED" and run.data.tags["signal"] == "SIGTERM"
    train(compose([*cfg, f"paths.runs={tmp_path / 'cut'}"]))
    _, run = _only_run(tmp_path / "cut")
    assert run.info.status == "FINISHED" and "signal" not in run.data.tags
    a, b = _final_weights(tmp_path / "whole"), _final_weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)
    for key in ("val/loss", "train/loss"):
        assert _metric_history(tmp_path / "cut", key) == _metric_history(tmp_path / "whole", key)


@pytest.mark.slow  # two training processes: 32 s at load 3 on the shared machine
def test_sigterm_mid_epoch_checkpoints_at_the_next_batch_and_the_rerun_finishes_the_run(tmp_path, uninterrupted):
    """SLURM's preemption (`--signal`), `kill`, `timeout`: SIGTERM once exited with status 0, printed
    nothing and left the run FAILED. Now: the batch in progress ends, last.ckpt is written there,
    one line, status 143, the run KILLED with a `signal` tag; the same command resumes at the next
    batch, clears the tag and ends exactly as a run that was never stopped."""
    import signal

    code, line = _signal_mid_epoch(tmp_path, signal.SIGTERM, uninterrupted)
    assert code == 128 + signal.SIGTERM, line
    assert line.startswith("error: stopped by SIGTERM; the MLflow run is marked KILLED; a checkpoint was written "
                           "after batch "), line
    _, run = _only_run(tmp_path)
    assert run.info.status == "KILLED" and run.data.tags["signal"] == "SIGTERM"
    (last,) = tmp_path.glob("outputs/*/*/checkpoints/last.ckpt")
    state = torch.load(last, weights_only=True)
    progress = state["loops"]["fit_loop"]["epoch_loop.batch_progress"]
    assert not progress["is_last_batch"] and 0 < progress["current"]["completed"] < 64, "not written mid-epoch"
    assert f"of 64 of epoch {state['epoch'] + 1}:" in line

    again = subprocess.run(_train_command(tmp_path), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    _, run = _only_run(tmp_path)
    assert run.info.status == "FINISHED" and "signal" not in run.data.tags and "error" not in run.data.tags
    a, b = _final_weights(uninterrupted), _final_weights(tmp_path)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the resumed epoch saw the same batches, the same sums
    for key in ("val/loss", "train/loss"):
        assert _metric_history(tmp_path, key) == _metric_history(uninterrupted, key)


_STUCK_STEP = """
import sys, time
from cnnlab.training import signals
from cnnlab.training.module import Classifier
from cnnlab.cli import main

signals.STEP_GRACE_S = 1.0
step = Classifier.training_step

def stuck(self, batch, batch_idx):
    if self.current_epoch == 1 and batch_idx == 2:
        print("stuck", flush=True)
        time.sleep(600)  # a step that never reaches a batch boundary (an absurd convolution)
    return step(self, batch, batch_idx)

Classifier.training_step = stuck
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_inside_a_step_that_never_ends_exits_within_seconds(tmp_path):
    """An 11-minute convolution held SIGTERM off for its whole length (Lightning waits for the
    batch boundary). The watchdog exits STEP_GRACE_S after the signal: status 143, one line, the
    run KILLED with the signal tag, the first epoch's checkpoint kept."""
    import signal
    import time

    job = subprocess.Popen([sys.executable, "-c", _STUCK_STEP, "train", *TINY, f"paths.runs={tmp_path}",
                            "trainer.max_epochs=2", "data.n_train=256"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in job.stdout:  # the run's log lines, then the stuck step's
        if line.strip() == "stuck":
            break
    sent = time.monotonic()
    job.send_signal(signal.SIGTERM)
    err = job.communicate(timeout=60)[1]
    assert time.monotonic() - sent < 15, "the watchdog did not exit in time"
    assert job.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == ("error: stopped by SIGTERM (the step in progress did not end within "
                                            "1 s); exiting now; the MLflow run is marked KILLED; the same command "
                                            "resumes from the last completed epoch")
    _, run = _only_run(tmp_path)
    assert run.info.status == "KILLED" and run.data.tags["signal"] == "SIGTERM"
    (last,) = tmp_path.glob("outputs/*/*/checkpoints/last.ckpt")
    assert torch.load(last, weights_only=True)["epoch"] == 0  # the end of epoch 1, to resume from


def test_ctrl_c_marks_the_run_killed_with_status_130(tmp_path, uninterrupted):
    import signal

    code, line = _signal_mid_epoch(tmp_path, signal.SIGINT, uninterrupted)
    assert code == 130 and line.startswith("error: stopped by SIGINT; the MLflow run is marked KILLED"), line
    _, run = _only_run(tmp_path)
    assert run.info.status == "KILLED" and run.data.tags["signal"] == "SIGINT"


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


def _only_run(runs: Path):
    client = MlflowClient(tracking_uri=f"sqlite:///{runs}/mlflow.db")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return client, run


def test_an_unreadable_last_checkpoint_resumes_from_the_newest_readable_one(tmp_path, caplog):
    """A truncated last.ckpt (a copy cut short, a disk that failed) made the rerun fail inside
    Lightning. Now the rerun moves it aside with a warning and resumes from best.ckpt, or from the
    first epoch when that is unreadable too, always in the same MLflow run."""
    cfg = [*TINY, f"paths.runs={tmp_path}", "trainer.deterministic=true"]
    train(compose([*cfg, "trainer.max_epochs=2", "checkpoint.monitor=val/acc_best", "checkpoint.mode=max"]))
    client, run = _only_run(tmp_path)
    folder = Path(run.data.tags["run_dir"]) / "checkpoints"
    last = folder / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    best_epoch = torch.load(folder / "best.ckpt", weights_only=True)["epoch"]

    with caplog.at_level("WARNING", logger="cnnlab"):
        train(compose([*cfg, "trainer.max_epochs=3", "checkpoint.monitor=val/acc_best", "checkpoint.mode=max"]))
    assert f"resuming from best.ckpt instead (after epoch {best_epoch + 1})" in caplog.text
    assert "last.ckpt cannot be read" in caplog.text and (folder / "last.ckpt.unreadable").is_file()
    _, again = _only_run(tmp_path)
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/loss")] == [1, 2, 3]
    assert torch.load(last, weights_only=True)["epoch"] == 2

    for name in ("last.ckpt", "best.ckpt"):  # both unreadable: from the first epoch
        (folder / name).write_bytes(b"not a checkpoint")
    caplog.clear()
    with caplog.at_level("WARNING", logger="cnnlab"):
        train(compose([*cfg, "trainer.max_epochs=4", "checkpoint.monitor=val/acc_best", "checkpoint.mode=max"]))
    assert "training again from the first epoch, in the same MLflow run" in caplog.text
    _, again = _only_run(tmp_path)
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/loss")] == [1, 2, 3, 4]
    assert torch.load(last, weights_only=True)["epoch"] == 3


def test_a_checkpoint_is_never_written_over_in_place(tmp_path, monkeypatch):
    """With TMPDIR on another file system (a tmpfs /tmp), Lightning's save moved its temporary
    file into place by copying it into last.ckpt: the previous checkpoint was truncated first, so a
    kill or a full disk during the copy lost both. Every write now goes to a file beside it that
    is renamed over it once complete: no checkpoint is ever opened for writing."""
    import builtins
    import os
    import tempfile

    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on a file system of its own")
    scratch = Path(tempfile.mkdtemp(dir=shm))
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    opened, real_open = [], builtins.open

    def watched(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and str(file).endswith(".ckpt") and set(mode) & set("wax+"):
            opened.append(str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", watched)
    try:
        train(compose([*TINY, f"paths.runs={tmp_path}", "trainer.max_epochs=2"]))
    finally:
        monkeypatch.undo()
        for leftover in scratch.iterdir():
            leftover.unlink()
        scratch.rmdir()
    assert opened == []
    (last,) = tmp_path.glob("outputs/*/*/checkpoints/last.ckpt")
    assert torch.load(last, weights_only=True)["epoch"] == 1
    assert not list(last.parent.glob(".*.partial"))


def test_a_run_directory_in_use_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    """The lock itself, quickly: while this process holds a run directory, `cnnlab train` on it
    stops with status 2 and one line, and never opens the MLflow run."""
    from filelock import FileLock
    from test_bad_inputs import _in_process  # cnnlab.cli.main in this process, Hydra's logging put back

    from cnnlab.training.resume import LOCK_FILE

    run_dir = tmp_path / "held"
    monkeypatch.setattr("cnnlab.training.run.run_directory", lambda cfg, name: run_dir)
    run_dir.mkdir(parents=True)
    with FileLock(str(run_dir / LOCK_FILE)):
        code, err = _in_process([*TINY, f"paths.runs={tmp_path}", "trainer.max_epochs=1"], capsys, monkeypatch)
    err = err.strip().splitlines()
    assert code == 2 and err[-1].startswith(f"error: the run in {run_dir} is in use by another process"), err
    assert not (tmp_path / "mlflow.db").exists() or _runs_in(tmp_path) == []


def _runs_in(runs: Path) -> list:
    client = MlflowClient(tracking_uri=f"sqlite:///{runs}/mlflow.db")
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


@pytest.mark.slow  # two processes from start to end: about a minute on the shared 2-core machine
def test_two_identical_commands_started_together_train_one_run_once(tmp_path):
    """Both once attached to one MLflow run and trained the same epochs. Now the run directory is
    locked: one trains, the other says in one line that the run is in use (exit 2). The training
    lasts about 10 s (0.7 s an epoch at 16,384 images here), far longer than the two start-ups can
    drift apart: with 2 epochs of 2,048 images the first run finished before the second reached the
    lock, which then found a finished run (exit 0)."""
    command = [sys.executable, "-m", "cnnlab.cli", "train", *TINY, f"paths.runs={tmp_path}", "trainer.max_epochs=4",
               "data.n_train=65536"]
    jobs = [subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = sorted((job.wait(timeout=300), job.stderr.read()) for job in jobs)
    (ok, _), (refused, err) = results
    assert (ok, refused) == (0, 2), results
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: the run in ")
    assert "is in use by another process (process " in err
    client, run = _only_run(tmp_path)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/loss")] == [1, 2, 3, 4]


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
