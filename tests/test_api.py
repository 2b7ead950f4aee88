"""The Python API (cnnlab.train, summary, compare): the README's example runs as written, its
Result agrees with the MLflow store, the run's log reaches the caller's stdout, a finished run is
returned again without training, and bad input fails as the command does, before any write."""

from __future__ import annotations

import ast
import contextlib
import io
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.hydra_config import HydraConfig
from mlflow.tracking import MlflowClient

import cnnlab
from cnnlab.api import override_list
from cnnlab.cli import main
from cnnlab.errors import ConfigError
from cnnlab.training.result import Result

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_python() -> str:
    """The ```python block of the README's "Python API" section (other sections have their own)."""
    section = README.read_text().split("\n## Python API", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return block


def _readme_train_overrides() -> list[str]:
    """The overrides the README's block gives cnnlab.train."""
    (call,) = [node for node in ast.walk(ast.parse(_readme_python()))
               if isinstance(node, ast.Call) and ast.unparse(node.func) == "cnnlab.train"]
    return ast.literal_eval(call.args[0])


def _run_readme(folder: Path) -> tuple[dict, str]:
    """The README's block, run in `folder` (its runs/ lands there) with stdout captured."""
    namespace: dict = {}
    out = io.StringIO()
    before = os.getcwd()
    os.chdir(folder)
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(_readme_python(), str(README), "exec"), namespace)
    finally:
        os.chdir(before)
    return namespace, out.getvalue()


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("api")
    first, printed = _run_readme(folder)
    again, printed_again = _run_readme(folder)  # the notebook cell run twice: nothing trained again
    client = MlflowClient(tracking_uri=f"sqlite:///{folder / 'runs' / 'mlflow.db'}")
    return first["result"], printed, again["result"], printed_again, client, folder


def test_the_readme_example_returns_what_the_store_holds(readme_run):
    result, _, _, _, client, _ = readme_run
    assert isinstance(result, Result)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert Path(run.data.tags["run_dir"]) == result.run_dir and (result.run_dir / "history.jsonl").is_file()
    epochs = int(run.data.params["trainer.max_epochs"])
    assert [row["epoch"] for row in result.history] == list(range(1, epochs + 1))
    stored = run.data.metrics
    assert result.metrics["test/acc"] == pytest.approx(stored["test/acc"])
    assert result.metrics["test/loss"] == pytest.approx(stored["test/loss"])
    val_loss = client.get_metric_history(result.run_id, "val/loss")
    best = min(val_loss, key=lambda m: (m.value, m.step))
    assert result.metrics["best/val/loss"] == pytest.approx(best.value) == pytest.approx(result.score)
    assert result.metrics["best/epoch"] == best.step
    for key in ("train/loss", "val/acc"):  # each epoch's row is the value MLflow has at that step
        by_step = {m.step: m.value for m in client.get_metric_history(result.run_id, key)}
        assert {row["epoch"]: pytest.approx(row[key]) for row in result.history} == by_step


def test_the_runs_log_reaches_the_callers_stdout(readme_run):
    result, printed, *_ = readme_run
    assert f"(MLflow run {result.run_id})" in printed  # the run's own log line, not only the print
    epochs = len(result.history)
    assert re.search(rf"^epoch {epochs}/{epochs}  train loss \d", printed, flags=re.M)
    assert re.search(rf"^done after epoch {epochs}$", printed, flags=re.M)  # the final block
    assert "Trainable params: 269,722" in printed  # ResNet-20 (He et al.: 0.27M), from cnnlab.summary
    assert re.search(r"^\s*all\s+1\s+0\s", printed, flags=re.M)  # cnnlab.compare: one variant, one seed


def test_a_finished_run_asked_again_is_returned_not_trained(readme_run):
    result, _, again, printed_again, client, _ = readme_run
    assert again == result  # run_id, run_dir, history, metrics, score
    assert "already trained" in printed_again and not re.search(r"^epoch ", printed_again, flags=re.M)
    experiments = [e.experiment_id for e in client.search_experiments()]
    assert [r.info.run_id for r in client.search_runs(experiments)] == [result.run_id]
    assert len(client.get_metric_history(result.run_id, "test/acc")) == 1  # not tested again


def test_the_command_finds_the_run_the_api_trained(readme_run, monkeypatch):
    """cnnlab.train(OVERRIDES) is the run `cnnlab train OVERRIDES` makes: same folder, same MLflow run."""
    result, *_, client, folder = readme_run
    monkeypatch.chdir(folder)
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # the command sets it for Hydra
    assert main(["train", *_readme_train_overrides()]) == 0
    experiments = [e.experiment_id for e in client.search_experiments()]
    assert [r.info.run_id for r in client.search_runs(experiments)] == [result.run_id]
    assert len(client.get_metric_history(result.run_id, "test/acc")) == 1  # found finished: not trained again
    assert (result.run_dir / ".hydra" / "overrides.yaml").is_file()  # Hydra's app ran in the API's run folder


def test_untracked_run_from_a_mapping_and_keywords(tmp_path):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = cnnlab.train({"data": "synthetic", "data.n_train": 64, "data.n_test": 32, "model.widths": [4],
                               "model.dense": [8], "trainer.max_epochs": 2, "tracking": "none",
                               "paths.runs": tmp_path}, seed=5)
    assert result.run_id is None and "(tracking off)" in out.getvalue()
    # Nothing left behind in the process: no Hydra job, no handler, the logger's level as it was.
    assert not HydraConfig.initialized()
    assert logging.getLogger("cnnlab").handlers == [] and logging.getLogger("cnnlab").level == logging.NOTSET
    rows = [json.loads(line) for line in (result.run_dir / "history.jsonl").read_text().splitlines()]
    assert result.history == rows and [row["epoch"] for row in rows] == [1, 2]
    assert re.findall(r"^epoch (\d)/2 ", out.getvalue(), flags=re.M) == ["1", "2"]
    best = min(rows, key=lambda row: row["val/loss"])  # checkpoint.monitor=val/loss, mode=min
    assert result.metrics["best/val/loss"] == best["val/loss"] == pytest.approx(result.score)
    assert result.metrics["best/epoch"] == best["epoch"]
    assert "seed=5" in result.run_dir.name.split(",")  # the keyword is an override like the others


@pytest.mark.parametrize("override", ["model.nosuchknob=1", "trainer.max_epochs=-1", "data=nosuchdata"])
def test_bad_input_is_the_commands_error_before_any_write(override, tmp_path, capsys):
    runs = tmp_path / "runs"
    argv = ["data=synthetic", override, f"paths.runs={runs}"]
    with pytest.raises(ConfigError) as info:
        cnnlab.train(argv)
    assert main(["train", *argv]) == 2
    assert capsys.readouterr().err == f"error: {info.value}\n"  # the same one line as `cnnlab train`
    assert not runs.exists()


def test_overrides_from_a_mapping_and_keywords():
    mapping = {"model": "vgg", "model.widths": [8, 16, 32], "model.bn": False, "ckpt_path": None}
    assert override_list(mapping, {"seed": 1}) == [
        "model=vgg", "model.widths=[8,16,32]", "model.bn=false", "ckpt_path=null", "seed=1"]
    text = cnnlab.summary(mapping)
    assert "conv 32 3x3" in text and text == cnnlab.summary(["model=vgg", "model.widths=[8,16,32]", "model.bn=false"])
    with pytest.raises(ConfigError, match="not a string|got the string"):
        cnnlab.train("data=synthetic")
    with pytest.raises(ConfigError, match="takes overrides only"):
        cnnlab.train(["-m", "seed=0,1"])


def test_a_run_from_python_prints_its_lines_without_lightnings_noise(tmp_path):
    """Outside a `cnnlab train` job Lightning prints through its own handler and warnings print
    themselves: the run's lines come without the ones every run repeats (cnnlab.training.console's
    NOISE), as on the command's console, and Lightning's handlers are left as they were."""
    code = (f"import logging, cnnlab; cnnlab.train(['data=synthetic', 'trainer.max_epochs=1', "
            f"'tracking.log_model=false', 'paths.runs={tmp_path}']); "
            "print('filters left', sum(len(h.filters) for h in logging.getLogger('lightning.pytorch').handlers))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    printed = done.stdout + done.stderr
    assert re.search(r"^epoch 1/1  train loss \d", printed, flags=re.M) and "done after epoch 1" in printed
    for noise in ("GPU available", "TPU available", "LitLogger", "stepping batches", "LeafSpec"):
        assert noise not in printed, noise
    assert "filters left 0" in printed


def test_import_is_cheap_and_train_stays_the_function():
    code = ("import sys, cnnlab; cnnlab.__all__; "
            "print([m for m in ('torch', 'lightning', 'mlflow', 'hydra') if m in sys.modules])")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"
    from cnnlab.train import main as hydra_app  # the submodule of the same name: imported, not in the way

    assert callable(hydra_app) and cnnlab.train is cnnlab.api.train
    assert {"Result", "compare", "summary", "train"} <= set(cnnlab.__all__)


def test_ddp_that_runs_the_command_again_is_refused_before_any_write(tmp_path):
    runs = tmp_path / "runs"
    with pytest.raises(ConfigError, match="trainer.strategy=ddp .*ddp_spawn"):
        cnnlab.train(["trainer=ddp_cpu", "data=synthetic", f"paths.runs={runs}"])
    assert not runs.exists()
