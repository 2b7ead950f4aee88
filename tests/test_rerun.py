"""Running a command again: it says which run it found and whether the code changed since; it
refuses to continue a run into changed code unless forced; run.fresh=true starts a new run beside
the old one. And what the MLflow dashboard shows of a run: experiment kind, dataset, description."""

import json
import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from cnnlab.config.compose import compose, container
from cnnlab.errors import ConfigError
from cnnlab.tracking.provenance import changes_since, command_line, provenance_tags
from cnnlab.training.artifacts import wants_weights_txt
from cnnlab.training.naming import run_description
from cnnlab.training.run import train

TINY = ["data=synthetic", "model.widths=[2]", "model.dense=[4]", "data.n_train=64", "data.n_test=32",
        "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "trainer.threads=1",
        "tracking.log_model=false", "seed=5"]
QUESTION = "Does a tiny net learn synthetic data?"


def _cfg(runs: Path, *extra: str):
    return compose([*TINY, f"paths.runs={runs}", *extra])


def _client(runs: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{runs.resolve()}/mlflow.db")


def _runs(runs: Path) -> list:
    client = _client(runs)
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "cnnlab"]


def _epochs(run_dir: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run_dir / "history.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    """One finished 1-epoch run, asked a question."""
    runs = tmp_path_factory.mktemp("runs")
    train(_cfg(runs, "trainer.max_epochs=1", f"ablation.question={QUESTION}"))
    (run,) = _runs(runs)
    return runs, run


def test_a_finished_run_found_again_names_itself_its_epochs_and_what_changed(first, caplog):
    runs, run = first
    cfg = _cfg(runs, "trainer.max_epochs=1", f"ablation.question={QUESTION}")
    name = run.data.tags["mlflow.runName"]
    with caplog.at_level(logging.INFO, logger="cnnlab"):
        train(cfg)
    (line,) = [m for m in _lines(caplog) if "already trained" in m]
    assert line.startswith(f"run {name} (MLflow run {run.info.run_id}) already trained 1 epochs (asked: 1)")
    assert "code and packages unchanged" in line and "raise trainer.max_epochs" in line
    # The packages changed since (faked in the store): said so, with how to start fresh; no error.
    client = _client(runs)
    client.set_tag(run.info.run_id, "version.torch", "1.0.0")
    caplog.clear()
    try:
        with caplog.at_level(logging.INFO, logger="cnnlab"):
            train(cfg)
    finally:
        client.set_tag(run.info.run_id, "version.torch", run.data.tags["version.torch"])
    (line,) = [m for m in _lines(caplog) if "already trained" in m]
    assert f"changed since: torch 1.0.0 -> {torch.__version__}" in line and "run.fresh=true" in line
    assert len(_runs(runs)) == 1  # nothing new


def test_resuming_into_changed_code_is_refused_unless_forced(tmp_path, caplog):
    runs = tmp_path
    train(_cfg(runs, "trainer.max_epochs=1"))
    (run,) = _runs(runs)
    run_id, run_dir, name = run.info.run_id, Path(run.data.tags["run_dir"]), run.data.tags["mlflow.runName"]
    commit = run.data.tags["mlflow.source.git.commit"]
    client = _client(runs)
    # A kill after epoch 1 of 2: its checkpoint holds epoch 1 and the MLflow run is not FINISHED.
    client.set_terminated(run_id, "KILLED")
    client.set_tag(run_id, "mlflow.source.git.commit", "0123456789" * 4)  # "trained by other code"
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file() and ".cnnlab." not in p.name}
    with pytest.raises(ConfigError) as refused:
        train(_cfg(runs, "trainer.max_epochs=2"))
    message = str(refused.value)
    assert "\n" not in message and f"run {name} (MLflow run {run_id}) stopped after 1 of 2 epochs" in message
    assert "git commit 0123456789 ->" in message and "run.fresh=true" in message and "run.resume=force" in message
    after = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file() and ".cnnlab." not in p.name}
    assert after == before  # nothing written
    assert client.get_run(run_id).info.status == "KILLED" and len(_runs(runs)) == 1
    # Forced: the same run continues from epoch 1, and the line says the code changed.
    with caplog.at_level(logging.INFO, logger="cnnlab"):
        train(_cfg(runs, "trainer.max_epochs=2", "run.resume=force"))
    (line,) = [m for m in _lines(caplog) if m.startswith("resuming")]
    assert f"(MLflow run {run_id}) after 1 of 2 epochs; changed since: git commit 0123456789" in line
    assert "run.resume=force" in line
    assert _epochs(run_dir) == [1, 2] and client.get_run(run_id).info.status == "FINISHED"
    # Killed again, after epoch 2 of 3, with the code it was trained with: resumed, and said so.
    client.set_tag(run_id, "mlflow.source.git.commit", commit)
    client.set_terminated(run_id, "KILLED")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="cnnlab"):
        train(_cfg(runs, "trainer.max_epochs=3"))
    (line,) = [m for m in _lines(caplog) if m.startswith("resuming")]
    assert line == f"resuming run {name} (MLflow run {run_id}) after 2 of 3 epochs; code and packages unchanged since"
    assert _epochs(run_dir) == [1, 2, 3] and len(_runs(runs)) == 1


def test_fresh_starts_a_second_run_beside_the_first_with_system_metrics(first, monkeypatch):
    runs, old = first
    old_dir = Path(old.data.tags["run_dir"])
    old_ckpt = (old_dir / "checkpoints" / "last.ckpt").stat().st_mtime_ns
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.1")  # MLflow's default: 10 s
    train(_cfg(runs, "trainer.max_epochs=1", "run.fresh=true", "tracking.system_metrics=true"))
    new = next(r for r in _runs(runs) if r.info.run_id != old.info.run_id)
    assert len(_runs(runs)) == 2 and new.info.status == "FINISHED"
    assert Path(new.data.tags["run_dir"]) == old_dir.with_name(old_dir.name + "-2")
    assert (old_dir / "checkpoints" / "last.ckpt").stat().st_mtime_ns == old_ckpt  # the old run is untouched
    assert _client(runs).get_run(old.info.run_id).info.status == "FINISHED"
    assert any(k.startswith("system/cpu") for k in new.data.metrics)  # MLflow's monitor ran on the new run
    assert not any(k.startswith("system/") for k in old.data.metrics)  # off by default


def test_the_dashboard_shows_a_training_experiment_the_dataset_and_a_description(first):
    runs, run = first
    client = _client(runs)
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"synthetic/train", "synthetic/test"}
    for context in ("train", "test"):
        dataset = inputs[f"synthetic/{context}"]
        assert dataset.dataset.digest == run.data.params["data.fingerprint"] == run.data.tags["data.fingerprint"]
        assert {t.key: t.value for t in dataset.tags} == {"mlflow.data.context": context}
        assert json.loads(dataset.dataset.profile) == {"train": 64, "validation": "the test set", "test": 32,
                                                       "classes": 4}
        assert "synthetic" in dataset.dataset.source
    assert run.data.tags["mlflow.note.content"] == f"{QUESTION}\n\nVariant: {run.data.tags['mlflow.runName']}"
    # weights.txt is the chapter's baseline's: this small variant has none (tracking.weights_txt=auto).
    assert not (Path(run.data.tags["run_dir"]) / "weights.txt").exists()
    assert "weights.txt" not in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_the_description_names_the_knobs_of_the_variant():
    cfg = compose(["experiment=bn"])
    overrides = ["model.bn=false", "seed=1", "trainer.threads=1", "paths.runs=/tmp/x"]
    assert run_description(cfg, "baseline-bn=false-s1", overrides) == (
        "Does batch normalisation after the convolution help?\n\n"
        "Variant: baseline-bn=false-s1 (model.bn=false, seed=1)")  # not where or how it ran
    assert run_description(compose([]), "baseline-s42", []) == "Variant: baseline-s42"


def test_weights_txt_is_on_for_the_chapters_baseline_only_unless_set():
    assert wants_weights_txt("auto", container(compose([]).model))  # model=baseline as the chapter has it
    assert wants_weights_txt("auto", container(compose(["experiment=bn"]).model))  # its control variant
    assert not wants_weights_txt("auto", container(compose(["model.bn=false"]).model))
    assert not wants_weights_txt("auto", container(compose(["model=lenet"]).model))
    assert wants_weights_txt(True, container(compose(["model=lenet"]).model))
    assert not wants_weights_txt(False, container(compose([]).model))
    with pytest.raises(ConfigError, match="tracking.weights_txt.*auto, true or false"):
        train(compose(["tracking.weights_txt=sometimes"]))


def test_the_command_tag_is_the_command_as_typed():
    typed = ["cnnlab-train", "model.kernels=[3,3]", "ablation.question=Is it real?", "-m"]
    assert command_line(typed) == "cnnlab train 'model.kernels=[3,3]' 'ablation.question=Is it real?' -m"
    assert shlex.split(command_line(typed)) == ["cnnlab", "train", *typed[1:]]
    assert command_line(["/venv/lib/cnnlab/cli.py", "reproduce", "abc"]) == "cnnlab reproduce abc"


def test_changes_are_compared_tag_by_tag():
    now = provenance_tags()
    assert changes_since(now, now) == []
    assert changes_since({}, now) == []  # a run recorded before a tag existed: not compared
    dirty = {**now, "git.diff.sha256": "aaaa"}
    assert changes_since(dirty, now) == [f"uncommitted diff aaaa -> {now['git.diff.sha256']}"]


@pytest.mark.slow
def test_fresh_through_the_command_line_never_touches_the_old_run(tmp_path):
    """Hydra names the folder (conf/train.yaml's cnnlab_fresh): NAME, then NAME-2, NAME-3."""
    command = [sys.executable, "-m", "cnnlab.cli", "train", *TINY, "trainer.max_epochs=1", f"paths.runs={tmp_path}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    for extra in ([], ["run.fresh=true"], ["run.fresh=true"]):
        done = subprocess.run([*command, *extra], capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
    folders = sorted(p.name for p in (tmp_path / "outputs" / "cnnlab").iterdir())
    assert len(folders) == 3 and folders[1:] == [folders[0] + "-2", folders[0] + "-3"]
    assert len(_runs(tmp_path)) == 3
