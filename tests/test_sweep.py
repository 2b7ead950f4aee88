"""Multirun sweeps: a parent MLflow run, child runs, failures recorded, and `compare`'s statistics."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from cnnlab.cli import main as cli
from cnnlab.errors import ConfigError
from cnnlab.results.compare import compare
from cnnlab.results.stats import paired_t

TINY = ["data=synthetic", "model.widths=[4]", "model.dense=[8]", "trainer.max_epochs=1",
        "trainer.accelerator=cpu", "tracking.log_model=false"]


def _sweep(runs: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cnnlab.cli", "train", "-m", *TINY,
                           f"paths.runs={runs}", *overrides], capture_output=True, text=True)


def _all_runs(runs: Path):
    client = MlflowClient(tracking_uri=f"sqlite:///{runs}/mlflow.db")
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids)


def test_parallel_sweep_makes_one_parent_and_four_children(tmp_path, capsys):
    done = _sweep(tmp_path, "experiment=rf", "seed=0,1", "hydra/launcher=joblib",
                  "hydra.launcher.n_jobs=2")
    assert done.returncode == 0, done.stderr[-3000:]
    runs = _all_runs(tmp_path)
    parents = [r for r in runs if r.data.tags.get("sweep") == "parent"]
    children = [r for r in runs if r.data.tags.get("sweep") != "parent"]
    assert len(parents) == 1 and len(children) == 4
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["sweep.grid.model.kernels"] == "[5],[3,3]"
    assert parent.data.tags["sweep.launcher"] == "JoblibLauncher"
    assert all(c.info.status == "FINISHED" for c in children)
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert {c.data.tags["knob.model.kernels"] for c in children} == {"[5]", "[3,3]"}
    # The comparison is attached to the parent run.
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    attached = {a.path for a in client.list_artifacts(parent.info.run_id, "compare")}
    assert {"compare/compare.md", "compare/compare.tex", "compare/val_acc_per_epoch.png",
            "compare/accuracy_vs_macs.png"} <= attached

    assert cli(["compare", "--runs", str(tmp_path), parent.info.run_id]) == 0
    out = capsys.readouterr().out
    table = compare(f"sqlite:///{tmp_path}/mlflow.db", parent=parent.info.run_id).table
    assert sorted(table["variant"]) == ["kernels=[3, 3]", "kernels=[5]"]
    assert list(table["n"]) == [2, 2]
    assert sum(line.lstrip().startswith("kernels=[") and " +- " in line
               for line in out.splitlines()) == 2  # the two printed rows
    assert "paired t-test (two-sided) on 2 shared seeds" in out


def test_a_failing_sweep_point_is_a_failed_child_and_the_sweep_goes_on(tmp_path):
    # A 17x17 valid kernel cannot fit the 16x16 synthetic images: analysis fails that job.
    done = _sweep(tmp_path, "model.padding=valid", "model.kernels=[3],[17]", "seed=0,1",
                  "tracking.experiment=fail")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "needs at least 17x17 input, got 16x16" in done.stderr
    children = [r for r in _all_runs(tmp_path) if r.data.tags.get("sweep") != "parent"]
    status = sorted((r.data.tags.get("knob.model.kernels"), r.info.status) for r in children)
    assert status == [("[17]", "FAILED"), ("[17]", "FAILED"), ("[3]", "FINISHED"),
                      ("[3]", "FINISHED")]
    result = compare(f"sqlite:///{tmp_path}/mlflow.db", experiment="fail")
    failed = result.table.set_index("variant").loc["kernels=[17]"]
    assert failed["failed"] == 2 and failed["n"] == 0
    assert any("kernels=[17]: 2 run(s) FAILED" in w and "17x17" in w for w in result.warnings)


def test_relaunching_the_same_sweep_trains_nothing_twice(tmp_path):
    for _ in range(2):
        done = _sweep(tmp_path, "seed=0,1", "tracking.experiment=again")
        assert done.returncode == 0, done.stderr[-3000:]
    assert (done.stdout + done.stderr).count("already trained 1 epochs") == 2
    runs = _all_runs(tmp_path)
    (parent,) = [r for r in runs if r.data.tags.get("sweep") == "parent"]
    children = [r for r in runs if r.data.tags.get("sweep") != "parent"]
    assert len(children) == 2 and parent.info.status == "FINISHED"
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}


def test_optuna_sweeper_preset_runs_trials_as_children(tmp_path):
    done = _sweep(tmp_path, "hparams_search=optuna", "hydra.sweeper.n_trials=2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Best value:" in done.stderr + done.stdout
    runs = _all_runs(tmp_path)
    (parent,) = [r for r in runs if r.data.tags.get("sweep") == "parent"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.data.tags["sweep.sweeper"] == "OptunaSweeper" and len(children) == 2
    assert {"optim.lr", "model.dropout", "model.widths"} <= set(parent.data.tags["sweep.keys"].split(","))
    assert len({c.data.params["optim.lr"] for c in children}) == 2  # Optuna chose two rates


def _log(client: MlflowClient, experiment_id: str, variant: str, seed: int, acc: float,
         test: float, layers: str = "conv:6:5:same") -> None:
    run = client.create_run(experiment_id)
    client.log_batch(run.info.run_id, params=[
        Param("seed", str(seed)), Param("model.kernels", variant),
        Param("model.layers_expanded", layers), Param("model.total_params", "100"),
        Param("model.macs", "1000"), Param("model.receptive_field", "5")],
        metrics=[Metric("val/acc_best", acc, 0, 0), Metric("test/acc", test, 0, 0),
                 Metric("time/epoch_s", 2.0, 0, 0)], tags=[RunTag("seed", str(seed))])
    client.set_terminated(run.info.run_id)


def test_compare_reproduces_exact_statistics(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("known")
    a = [0.50, 0.60, 0.70]
    b = [0.55, 0.70, 0.71]
    for seed in range(3):
        _log(client, experiment, "[5]", seed, a[seed], a[seed] - 0.1)
        _log(client, experiment, "[3,3]", seed, b[seed], b[seed] - 0.1, layers="conv:6:3:same")
    result = compare(uri, experiment="known")
    table = result.table.set_index("variant")
    five = table.loc["kernels=[5]"]
    assert list(table.index) == ["kernels=[3, 3]", "kernels=[5]"]  # natural order: (3, 3) < (5,)
    assert five["n"] == 3
    assert five["val/acc_best mean"] == pytest.approx(0.6)
    assert five["val/acc_best std"] == pytest.approx(0.1)  # sample std, n - 1
    half = 4.302652729749464 * 0.1 / math.sqrt(3)  # t(0.975, df=2) * s / sqrt(n)
    assert five["val/acc_best ci95 low"] == pytest.approx(0.6 - half)
    assert five["val/acc_best ci95 high"] == pytest.approx(0.6 + half)
    assert five["test/acc mean"] == pytest.approx(0.5)
    assert (five["params"], five["MACs"], five["RF"], five["s/epoch"]) == (100, 1000, 5, 2.0)
    (pair,) = result.pairs
    # Reference kernels=[3, 3] sorts first, so the difference is a - b per seed.
    d = [x - y for x, y in zip(a, b)]
    mean = sum(d) / 3
    sd = math.sqrt(sum((v - mean) ** 2 for v in d) / 2)
    t = mean / (sd / math.sqrt(3))
    assert pair.a_label == "kernels=[3, 3]" and pair.b_label == "kernels=[5]" and pair.n == 3
    assert pair.method == "paired t-test"
    assert pair.mean_diff == pytest.approx(mean)
    assert t == pytest.approx(-2.0486, abs=1e-4)
    assert pair.p_value == pytest.approx(1 - abs(t) / math.sqrt(2 + t * t))  # exact for df = 2
    half = 4.302652729749464 * sd / math.sqrt(3)  # the Student-t interval of the mean difference
    assert (pair.ci_low, pair.ci_high) == pytest.approx((mean - half, mean + half))
    assert pair.p_holm == pytest.approx(pair.p_value)  # one comparison: Holm changes nothing
    assert not any("(< 3)" in w for w in result.warnings)  # n = 3: no small-n warning
    assert "\\toprule" in result.latex() and "\\bottomrule" in result.latex()
    assert result.markdown().startswith("| variant | n | failed |")
    assert result.csv().splitlines()[0].startswith("variant,n,failed,val/acc_best n,val/acc_best mean")


def test_compare_warns_about_small_n_and_identical_networks(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("same")
    for seed in range(2):
        _log(client, experiment, "[5]", seed, 0.5, 0.5)
        _log(client, experiment, "[5x5]", seed, 0.5, 0.5)  # spelled differently, same network
    warnings = compare(uri, experiment="same").warnings
    assert any("n = 2 seeds (< 3)" in w for w in warnings)
    assert any("build the same network" in w for w in warnings)


def test_paired_statistics_by_hand():
    result = paired_t([1.0, 2.0, 3.0, 4.0], [2.0, 2.5, 3.5, 5.0])
    assert result.mean == pytest.approx(0.75)
    # d = [1, .5, .5, 1]: sd = sqrt(1/12), t = 0.75 / (sd / 2) = 5.1962, df = 3
    assert result.p_value == pytest.approx(0.013847, abs=1e-5)


def test_compare_unknown_experiment_lists_the_existing_ones(tmp_path, capsys):
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    client.create_experiment("exists")
    assert cli(["compare", "--runs", str(tmp_path), "missing"]) == 2
    err = capsys.readouterr().err
    assert "no MLflow experiment 'missing'" in err and "exists" in err
    with pytest.raises(ConfigError, match="metric must be one of"):
        compare(f"sqlite:///{tmp_path}/mlflow.db", experiment="exists", metric="loss")


def test_an_interrupted_sweep_resumes_without_duplicates(tmp_path):
    """Kill a 4-job sweep once 2 jobs finished; the same command runs only the other 2."""
    import os
    import signal
    import sqlite3
    import time

    args = [sys.executable, "-m", "cnnlab.cli", "train", "-m", *TINY, f"paths.runs={tmp_path}",
            "seed=0,1,2,3", "trainer.max_epochs=3", "data.n_train=2048", "tracking.experiment=cut"]
    job = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    db, deadline = tmp_path / "mlflow.db", time.monotonic() + 120
    finished = 0
    while finished < 2 and time.monotonic() < deadline and job.poll() is None:
        time.sleep(0.2)
        if db.exists():
            with sqlite3.connect(db) as con:
                finished = con.execute("select count(*) from runs r join tags t on r.run_uuid = t.run_uuid "
                                       "where t.key = 'knob.seed' and r.status = 'FINISHED'").fetchone()[0]
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    assert finished == 2, "the sweep did not reach 2 finished jobs before the kill"
    again = subprocess.run(args, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    log = again.stdout + again.stderr
    assert log.count("already trained 3 epochs") == 2  # exactly 2 jobs trained again
    children = [r for r in _all_runs(tmp_path) if r.data.tags.get("sweep") != "parent"]
    assert sorted(r.data.tags["knob.seed"] for r in children) == ["0", "1", "2", "3"]  # no duplicates
    assert all(r.info.status == "FINISHED" for r in children)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    for run in children:  # one value per epoch, even for the job the kill interrupted
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
        assert len(steps) == len(set(steps)) == 3


@pytest.mark.slow
def test_ctrl_c_in_a_sweep_marks_the_job_and_the_parent_killed_and_prints_the_command_that_resumes(tmp_path):
    """Ctrl-C during a sweep left its parent run RUNNING (Hydra calls no end-of-sweep hook). Now the
    running job's run and the parent are KILLED with signal=SIGINT, the last line names the
    command, and that command finishes the sweep: the parent FINISHED, its signal tag gone."""
    import shlex
    import signal
    import time

    overrides = [*TINY, f"paths.runs={tmp_path}", "seed=0,1", "trainer.max_epochs=4", "data.n_train=2048",
                 "tracking.experiment=cut"]
    args = [sys.executable, "-m", "cnnlab.cli", "train", "-m", *overrides]
    job = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and job.poll() is None:  # the first job's first epoch is done
        if any(p.read_text().strip() for p in tmp_path.glob("multirun/**/history.jsonl")):
            break
        time.sleep(0.05)
    job.send_signal(signal.SIGINT)
    _, err = job.communicate(timeout=120)
    assert job.returncode == 130, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: stopped by SIGINT; the MLflow run is marked KILLED"), line
    assert "the sweep's MLflow parent run" in line and "is marked KILLED" in line
    assert line.endswith("the same command resumes the sweep (finished jobs are skipped): "
                         + shlex.join(["cnnlab", "train", "-m", *overrides]))
    found = _all_runs(tmp_path)
    (parent,) = [r for r in found if r.data.tags.get("sweep") == "parent"]
    (child,) = [r for r in found if r.data.tags.get("sweep") != "parent"]  # the second job never started
    assert parent.info.run_id in line
    for run in (parent, child):
        assert run.info.status == "KILLED" and run.data.tags["signal"] == "SIGINT"
    assert child.data.tags["knob.seed"] == "0"

    again = subprocess.run(args, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    found = _all_runs(tmp_path)
    assert {r.info.run_id: r.info.status for r in found if r.data.tags.get("sweep") == "parent"} == {
        parent.info.run_id: "FINISHED"}
    children = [r for r in found if r.data.tags.get("sweep") != "parent"]
    assert sorted(r.data.tags["knob.seed"] for r in children) == ["0", "1"]
    assert all(r.info.status == "FINISHED" and "signal" not in r.data.tags for r in [*children, *found])
