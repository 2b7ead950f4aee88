"""`write_report`: report.md, report.html and table.tex agree with `compare`, stand alone, trace provenance."""

import base64
import html
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from cnnlab.errors import ConfigError
from cnnlab.results.compare import compare
from cnnlab.results.report import write_report

TINY = ["data=synthetic", "model.widths=[4]", "model.dense=[8]", "trainer.max_epochs=1",
        "trainer.accelerator=cpu", "tracking.log_model=false"]
LAYERS = {"[5]": "conv:6:5:same bn relu flatten dense:10:softmax",
          "[3,3]": "conv:6:3:same bn relu conv:6:3:same bn relu flatten dense:10:softmax"}
# An experiment name with HTML metacharacters: the HTML must escape it.
QUESTION = "rf: <5x5> & 3x3"


def _log(client: MlflowClient, experiment_id: str, kernels: str, seed: int, acc: float, test: float,
         commit: str = "c0ffee", fingerprint: str = "f00d", dirty: str = "false") -> str:
    run = client.create_run(experiment_id)
    client.log_batch(run.info.run_id, params=[
        Param("seed", str(seed)), Param("model.kernels", kernels), Param("model.layers_expanded", LAYERS[kernels]),
        Param("model.total_params", "100" if kernels == "[5]" else "120"), Param("model.macs", "1000"),
        Param("model.receptive_field", "5"), Param("data.fingerprint", fingerprint)],
        metrics=[Metric("val/acc", acc - 0.1 * (2 - step), 0, step) for step in range(3)]
        + [Metric("val/acc_best", acc, 0, 2), Metric("test/acc", test, 0, 2), Metric("time/epoch_s", 2.0, 0, 2)],
        tags=[RunTag("seed", str(seed)), RunTag("mlflow.source.git.commit", commit), RunTag("git.dirty", dirty),
              RunTag("version.torch", "2.99.0"), RunTag("version.lightning", "2.88.0"),
              RunTag("version.mlflow", "3.77.0"), RunTag("host", "labhost")])
    client.set_terminated(run.info.run_id)
    return run.info.run_id


@pytest.fixture
def known(tmp_path):
    """Two variants x three seeds with known accuracies, one commit, one data fingerprint."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment(QUESTION)
    a, b = [0.50, 0.60, 0.70], [0.55, 0.70, 0.71]
    for seed in range(3):
        _log(client, experiment, "[5]", seed, a[seed], a[seed] - 0.1)
        _log(client, experiment, "[3,3]", seed, b[seed], b[seed] - 0.1)
    return uri, tmp_path


def test_report_numbers_are_compares_numbers(known):
    uri, tmp_path = known
    paths = write_report(uri, experiment=QUESTION, out=tmp_path / "report")
    assert set(paths) == {"report.md", "report.html", "table.tex", "val_acc_per_epoch.png", "accuracy_vs_macs.png"}
    assert all(p.is_file() and p.parent == tmp_path / "report" for p in paths.values())
    md, page, tex = (paths[n].read_text() for n in ("report.md", "report.html", "table.tex"))
    result = compare(uri, experiment=QUESTION)
    shown = result.display().set_index("variant")
    # Values known independently: [5] has mean 0.6, sample std 0.1 on val/acc_best.
    assert shown.loc["kernels=[5]", "val/acc_best mean +- std"] == "0.6000 +- 0.1000"
    assert result.markdown() in md  # compare's table, pairs and warnings, verbatim
    for variant, row in shown.iterrows():
        for column in ("val/acc_best mean +- std", "val/acc_best 95% CI", "test/acc mean +- std", "test/acc 95% CI"):
            assert row[column] in md and row[column] in page
            assert row[column].replace("+-", "$\\pm$") in tex
        assert f"<tr><td>{variant}</td><td>{row['n']}</td><td>{row['failed']}</td>" in page
    (pair,) = result.pairs
    assert pair.method == "paired t-test" and len(pair.figures()) >= 8
    for label, text in pair.figures():  # every figure compare shows, in all three formats
        assert text in md and html.escape(text) in page and text.replace("%", "\\%") in tex, (label, text)
    assert tex == result.latex()
    assert all(rule in tex for rule in ("\\toprule", "\\midrule", "\\bottomrule"))
    # Architecture: each variant's expanded layers, and compare's parameter count.
    assert re.search(r"\| kernels=\[5\] \| 100 \| 1,000 \| 5 \| " + re.escape(LAYERS["[5]"]) + r" \|", md)
    assert LAYERS["[3,3]"] in page
    assert "All 6 runs that recorded a commit share one commit: c0ffee." in md
    assert "All 6 runs that recorded a data fingerprint share one data fingerprint: f00d." in md
    assert "dirty checkout" not in md
    assert md.count("| labhost | f00d |") == 6 and "| 2.99.0 | 2.88.0 | 3.77.0 |" in md


def test_html_is_self_contained_and_escaped(known):
    uri, tmp_path = known
    paths = write_report(uri, experiment=QUESTION, out=tmp_path / "report")
    page = paths["report.html"].read_text()
    images = re.findall(r'<img [^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 2
    assert base64.b64decode(images[0]) == paths["val_acc_per_epoch.png"].read_bytes()
    assert "http" not in page and "<link" not in page and "<script" not in page
    assert "rf: &lt;5x5&gt; &amp; 3x3" in page and "<5x5>" not in page
    assert "<style>" in page
    md = paths["report.md"].read_text()
    assert "![Validation accuracy per epoch" in md and "(val_acc_per_epoch.png)" in md


def test_mixed_commits_and_data_are_called_out(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("mixed")
    for seed in range(2):
        _log(client, experiment, "[5]", seed, 0.5, 0.4, commit="aaa", fingerprint="d1")
        _log(client, experiment, "[3,3]", seed, 0.6, 0.5, commit="bbb", fingerprint=f"s{seed}", dirty="true")
    md = write_report(uri, experiment="mixed", out=tmp_path / "r")["report.md"].read_text()
    assert "The runs do not share one commit: aaa (2 runs), bbb (2 runs)." in md
    assert "The runs do not share one data fingerprint" in md
    assert "Runs with the same seed saw different data" in md
    assert "2 of 4 runs ran on a dirty checkout" in md


def test_seed_dependent_data_is_fine_within_a_seed(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("synthetic")
    for seed in range(2):
        for kernels in ("[5]", "[3,3]"):
            _log(client, experiment, kernels, seed, 0.5 + seed / 10, 0.4, fingerprint=f"seed{seed}")
    md = write_report(uri, experiment="synthetic", out=tmp_path / "r")["report.md"].read_text()
    assert "The runs do not share one data fingerprint: seed0 (2 runs), seed1 (2 runs)." in md
    assert "Runs with the same seed share one" in md


def test_unknown_experiment_or_run_is_compares_error(tmp_path):
    MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db").create_experiment("exists")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with pytest.raises(ConfigError, match="no MLflow experiment 'missing'"):
        write_report(uri, experiment="missing", out=tmp_path / "r")
    with pytest.raises(ConfigError, match="no MLflow run '0123456789abcdef0123456789abcdef'"):
        write_report(uri, parent="0123456789abcdef0123456789abcdef", out=tmp_path / "r")
    assert not (tmp_path / "r").exists()  # nothing written for bad input


def test_report_of_a_real_sweep_is_logged_to_its_parent(tmp_path):
    done = subprocess.run([sys.executable, "-m", "cnnlab.cli", "train", "-m", *TINY, f"paths.runs={tmp_path}",
                           "model.kernels=[5],[3,3]", "seed=0,1", "tracking.experiment=report",
                           "data.n_train=64", "data.n_test=32"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    (parent,) = [r for r in client.search_runs([client.get_experiment_by_name("report").experiment_id])
                 if r.data.tags.get("sweep") == "parent"]
    parent_id = parent.info.run_id
    paths = write_report(uri, parent=parent_id, out=tmp_path / "report")
    logged = {a.path for a in client.list_artifacts(parent_id, "report")}
    assert logged == {f"report/{name}" for name in paths}
    md = Path(client.download_artifacts(parent_id, "report/report.md", str(tmp_path / "down"))).read_text()
    assert md == paths["report.md"].read_text()
    assert "- Swept knobs (sweep.keys): model.kernels,seed" in md
    assert compare(uri, parent=parent_id).markdown() in md
    assert "All 4 runs that recorded a commit share one commit" in md
    # Synthetic data is made from the seed: same data within a seed, not across seeds.
    assert "Runs with the same seed share one" in md
    assert md.count(f"| {torch.__version__} |") == 4


def test_a_run_that_failed_before_training_neither_agrees_nor_disagrees(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("failed")
    for seed in range(2):
        _log(client, experiment, "[5]", seed, 0.5, 0.4)
    # What record_failure leaves: the config's params and an error, no provenance, no layer list.
    run = client.create_run(experiment, tags={"error": "ConfigError: too big", "seed": "0"})
    client.log_batch(run.info.run_id, params=[Param("seed", "0"), Param("model.kernels", "[17]")])
    client.set_terminated(run.info.run_id, status="FAILED")
    md = write_report(uri, experiment="failed", out=tmp_path / "r")["report.md"].read_text()
    assert "All 2 runs that recorded a commit share one commit: c0ffee (1 run(s) did not record one)." in md
    assert "| kernels=[17] | -- | -- | -- | -- | -- |" in md
    assert f"| {run.info.run_id} | kernels=[17] | FAILED | 0 | -- |" in md
    assert "kernels=[17]: 1 run(s) FAILED: ConfigError: too big" in md


def test_report_command_writes_the_files_and_prints_their_paths(known, capsys):
    from cnnlab.cli import main as cli

    _, runs = known
    assert cli(["report", "--runs", str(runs), QUESTION, "--out", str(runs / "rep")]) == 0
    printed = capsys.readouterr().out.split()
    assert {Path(p).name for p in printed} >= {"report.md", "report.html", "table.tex"}
    assert all(Path(p).is_file() for p in printed)
    assert cli(["report", "--runs", str(runs), "no-such-ablation"]) == 2
