"""`cnnlab ablate`: rounds of seeds until each comparison is decided, resumable, bad input first.

The orchestration tests replace a round's training with runs logged straight into the store
(known effects, no training); one test trains a real round on synthetic data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from cnnlab.cli import main as cli
from cnnlab.results import ablate as ablate_module
from cnnlab.results.ablate import Settings, ablate

TINY = ["data=synthetic", "model.widths=[4]", "model.dense=[8]", "trainer.max_epochs=1", "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false", "tracking.log_model=false"]


def _fake_rounds(monkeypatch, effect: float, fail_on_call: int | None = None):
    """Each round logs one FINISHED child per (variant, seed) with test/acc = base + effect for [3,3]."""
    calls = []

    def fake_round(settings, plan, parent, seeds):
        calls.append(list(seeds))
        if fail_on_call is not None and len(calls) == fail_on_call:
            raise KeyboardInterrupt
        client = MlflowClient(tracking_uri=plan.uri)
        experiment = client.get_run(parent).info.experiment_id
        for seed in seeds:
            rng = np.random.default_rng(seed)
            base = 0.55 + rng.normal(0, 0.01)
            for kernels, value in (("[5]", base), ("[3,3]", base + effect + rng.normal(0, 0.002))):
                run = client.create_run(experiment, tags={"mlflow.parentRunId": parent})
                client.log_batch(run.info.run_id, params=[
                    Param("seed", str(seed)), Param("model.kernels", kernels), Param("data.validation", "split"),
                    Param("ablation.control", "kernels=[5]")],
                    metrics=[Metric("test/acc", value, 0, 1)],
                    tags=[RunTag("knob.model.kernels", kernels), RunTag("knob.seed", str(seed))])
                client.set_terminated(run.info.run_id)

    monkeypatch.setattr(ablate_module, "_round", fake_round)
    return calls


def _settings(tmp_path: Path, **kw) -> Settings:
    return Settings("rf", (*TINY, f"paths.runs={tmp_path}"), **{"max_seeds": 20, "margin": 0.005, **kw})


def test_a_clear_effect_is_decided_early_and_recorded(tmp_path, monkeypatch):
    calls = _fake_rounds(monkeypatch, effect=0.02)
    outcome = ablate(_settings(tmp_path))
    assert outcome.states == {"kernels=[3, 3]": "better"}
    assert outcome.seeds < 20 and outcome.seeds == sum(len(c) for c in calls)  # stopped early
    assert outcome.reference == "kernels=[5]" and outcome.metric == "test/acc"
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    parent = client.get_run(outcome.parent)
    assert parent.info.status == "FINISHED" and parent.data.tags["decision.kernels:3 3"] == "better"
    assert json.loads(parent.data.tags["ablation.decisions"]) == {"kernels=[3, 3]": "better"}
    assert "family-wise error <= 0.05" in parent.data.tags["ablation.error_rate"]
    means = client.get_metric_history(outcome.parent, "ablate/kernels:3 3/mean")
    assert sorted(m.step for m in means) == [look["seeds"] for look in outcome.looks]  # every round recorded
    lows = client.get_metric_history(outcome.parent, "ablate/kernels:3 3/low")  # logged once finite
    assert max(lows, key=lambda m: m.step).value > 0  # decided "better": the interval excludes 0


def test_no_difference_within_a_wide_margin_is_equivalent(tmp_path, monkeypatch):
    _fake_rounds(monkeypatch, effect=0.0)
    outcome = ablate(_settings(tmp_path, margin=0.05))
    assert outcome.states == {"kernels=[3, 3]": "equivalent"} and outcome.seeds < 20


def test_a_killed_ablation_resumes_without_rerunning_a_seed_or_forgetting_a_look(tmp_path, monkeypatch):
    calls = _fake_rounds(monkeypatch, effect=0.02, fail_on_call=3)
    with pytest.raises(KeyboardInterrupt):
        ablate(_settings(tmp_path))
    state = json.loads(next((tmp_path / "ablate").glob("*/state.json")).read_text())
    assert [look["seeds"] for look in state["looks"]] == [2, 4]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    assert client.get_run(state["parent"]).info.status == "KILLED"
    calls = _fake_rounds(monkeypatch, effect=0.02)  # the same command again
    outcome = ablate(_settings(tmp_path))
    assert outcome.parent == state["parent"] and outcome.states == {"kernels=[3, 3]": "better"}
    assert [look["seeds"] for look in outcome.looks][:2] == [2, 4]  # earlier looks kept
    assert calls[0] == [4, 5]  # resumed at the round that was killed
    children = client.search_runs([client.get_run(outcome.parent).info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{outcome.parent}'")
    keys = [(c.data.params["model.kernels"], c.data.params["seed"]) for c in children]
    assert len(keys) == len(set(keys))  # no seed trained twice


@pytest.mark.parametrize(("args", "words"), [
    (["nosuch"], ("no experiment preset 'nosuch'", "rf")),
    (["rf", "--max-seeds", "1"], ("--max-seeds must be an integer >= 2", "got 1")),
    (["rf", "--margin", "0"], ("--margin must be a number > 0", "got 0.0")),
    (["rf", "--alpha", "0.6"], ("--alpha must be a number in (0, 0.5)", "got 0.6")),
    (["rf", "--round", "0"], ("--round must be an integer >= 1", "got 0")),
    (["rf", "seed=3"], ("ablate chooses the seeds itself",)),
    (["baseline"], ("sweeps no variants",)),
])
def test_bad_input_is_one_line_before_anything_runs(args, words, tmp_path, capsys):
    assert cli(["ablate", *args, f"paths.runs={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and all(w in err[0] for w in words), err
    assert not (tmp_path / "mlflow.db").exists()


def test_a_real_round_on_synthetic_data(tmp_path):
    """Two variants x 2 seeds trained through `cnnlab train -m` (the basic launcher): one look, undecided."""
    done = subprocess.run([sys.executable, "-m", "cnnlab.cli", "ablate", "rf", "--max-seeds", "2", *TINY,
                           f"paths.runs={tmp_path}"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "kernels=[3, 3]: undecided" in done.stdout
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    (parent,) = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.ablate = 'parent'")
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted((c.data.params["model.kernels"], c.data.params["seed"]) for c in children) == [
        ("[3, 3]", "0"), ("[3, 3]", "1"), ("[5]", "0"), ("[5]", "1")]
    assert all(c.info.status == "FINISHED" and c.data.params["data.validation"] == "split" for c in children)
    assert parent.data.tags["decision.kernels:3 3"] == "undecided"


def test_compare_and_report_show_the_decisions_and_their_error_rate(tmp_path, monkeypatch):
    from cnnlab.results.compare import compare
    from cnnlab.results.report import write_report

    _fake_rounds(monkeypatch, effect=0.02)
    outcome = ablate(_settings(tmp_path))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    for result in (compare(uri, parent=outcome.parent), compare(uri, experiment="rf: one 5x5 vs two stacked 3x3")):
        assert result.decisions == {"kernels=[3, 3]": "better"}
        assert any(line.startswith("decisions (cnnlab ablate, against kernels=[5]): kernels=[3, 3]: better; "
                                   "anytime-valid") for line in result.lines())
    md = write_report(uri, parent=outcome.parent, out=tmp_path / "report")["report.md"].read_text()
    assert "kernels=[3, 3]: better" in md and "family-wise error <= 0.05" in md
