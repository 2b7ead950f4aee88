"""One tracked run end to end on synthetic data: MLflow holds everything, resume continues it."""

import json
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from cnnlab.config.compose import compose
from cnnlab.errors import ConfigError
from cnnlab.model.build import build
from cnnlab.model.plan import model_plan
from cnnlab.train import train

TINY = ["data=synthetic", "model=baseline", "model.widths=[4]", "model.dense=[8]",
        "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "seed=3", "tracking.weights_txt=true"]


def _cfg(runs: Path, *extra: str):
    return compose([*TINY, f"paths.runs={runs}", *extra])


def _client(runs: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{runs.resolve()}/mlflow.db")


def _runs(runs: Path):
    client = _client(runs)
    experiments = client.search_experiments()
    return client.search_runs([e.experiment_id for e in experiments])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One 2-epoch run, then the same command with max_epochs=3 (a resume)."""
    runs = tmp_path_factory.mktemp("runs")
    first = train(_cfg(runs, "trainer.max_epochs=2")).score
    (run,) = _runs(runs)
    history = {k: [m.step for m in _client(runs).get_metric_history(run.info.run_id, k)]
               for k in ("train/loss", "val/acc")}
    second = train(_cfg(runs, "trainer.max_epochs=3")).score
    third = train(_cfg(runs, "trainer.max_epochs=3")).score  # nothing left to do
    return runs, run, history, first, (second, third)


def test_one_finished_run_with_params_tags_and_metrics(trained):
    runs, run, history, first, _ = trained
    assert run.info.status == "FINISHED"
    params, tags, metrics = run.data.params, run.data.tags, run.data.metrics
    assert params["model.total_params"] == str(model_plan(_cfg(runs)).analysis.total_params)
    for key in ("model.macs", "model.receptive_field", "optim.lr", "data.batch_size",
                "model.layers_expanded", "data.fingerprint"):
        assert key in params
    assert params["optim.eps"] == "1e-07"
    for key in ("mlflow.source.git.commit", "git.dirty", "command", "version.torch",
                "version.lightning", "version.mlflow", "host", "device", "seed"):
        assert key in tags
    assert tags["seed"] == "3" and tags["mlflow.runName"].endswith("-s3")
    for key in ("train/loss", "train/acc", "val/loss", "val/acc", "val/acc_best", "test/loss",
                "test/acc"):
        assert key in metrics
    # One value per epoch: 2 epochs -> 2 distinct steps.
    assert len(history["train/loss"]) == 2 and len(set(history["train/loss"])) == 2
    assert first == pytest.approx(min(m.value for m in _client(runs).get_metric_history(
        run.info.run_id, "val/loss")[:2]))


def test_every_artifact_is_logged(trained):
    runs, run, *_ = trained
    client = _client(runs)
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"summary.txt", "summary.json", "config.yaml", "weights.txt", "curves.png",
            "checkpoints"} <= names
    ckpts = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
    assert ckpts == {"checkpoints/best.ckpt", "checkpoints/last.ckpt"}
    weights = Path(client.download_artifacts(run.info.run_id, "weights.txt")).read_text()
    assert "conv0.weight shape=(4, 3, 5, 5)" in weights and "bn1.weight shape=(4,)" in weights
    assert "..." not in weights  # full values, not numpy's abbreviation
    assert "running_mean" not in weights  # trainable variables only


def test_logged_model_predicts_like_the_trained_model(trained):
    runs, run, *_ = trained
    mlflow.set_tracking_uri(f"sqlite:///{runs.resolve()}/mlflow.db")
    logged = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")
    cfg = _cfg(runs, "trainer.max_epochs=3")
    plan = model_plan(cfg)
    network = build(plan.analysis, logits=True)
    ckpt_dir = Path(run.data.tags["run_dir"]) / "checkpoints"
    state = torch.load(ckpt_dir / "last.ckpt", weights_only=True)["state_dict"]
    network.load_state_dict({k.removeprefix("network."): v for k, v in state.items()
                             if k.startswith("network.")})
    x = torch.rand(5, 3, 16, 16)
    expected = torch.softmax(network.eval()(x), dim=1)
    torch.testing.assert_close(logged(x), expected, rtol=1e-5, atol=1e-6)


def test_running_again_resumes_the_same_run(trained):
    runs, run, _, _, second = trained
    (again,) = _runs(runs)  # still exactly one run
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    steps = [m.step for m in _client(runs).get_metric_history(run.info.run_id, "train/loss")]
    assert len(steps) == 3 and len(set(steps)) == 3  # epochs continue, no duplicate step
    assert steps == sorted(steps)
    history = (Path(run.data.tags["run_dir"]) / "history.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in history] == [1, 2, 3]
    # The same command once more: already complete, so nothing is trained or logged again.
    assert second[1] == pytest.approx(second[0])
    test_steps = _client(runs).get_metric_history(run.info.run_id, "test/acc")
    assert len(test_steps) == 2  # one test after each of the two real trainings


def test_missing_dataset_is_a_clear_error_before_any_run(tmp_path):
    cfg = compose(["data=cifar10", "data.download=false", f"paths.runs={tmp_path}"])
    with pytest.raises(ConfigError) as info:
        train(cfg)
    assert "data.root" in str(info.value) and str(tmp_path) in str(info.value)
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("override, fragment", [
    ("optim.lr=0", "optim.lr must be a finite number in (0"),
    ("optim.lr=-1e-3", "optim.lr must be a finite number in (0"),
    ("optim.lr=nan", "optim.lr must be a finite number"),
    ("optim.name=rmsprop", "optim.name must be one of adam, adamw, sgd"),
    ("data.batch_size=0", "data.batch_size"),
    ("trainer.max_epochs=0", "trainer.max_epochs must be an integer >= 1, got 0"),
    ("trainer.precision=8", "trainer.precision must be one of"),
    ("checkpoint.mode=best", "checkpoint.mode must be one of min, max"),
    ("trainer.compile=fast", "trainer.compile must be one of null, default, reduce-overhead"),
    ("trainer.channels_last=maybe", "trainer.channels_last must be true or false"),
    ("trainer.sync_batchnorm=2", "trainer.sync_batchnorm must be true or false, got 2"),
    ("trainer.num_nodes=0", "trainer.num_nodes must be an integer >= 1, got 0"),
    ("trainer.benchmark=fast", "trainer.benchmark must be null, true or false, got 'fast'"),
])
def test_bad_training_config_fails_before_any_run(tmp_path, override, fragment):
    with pytest.raises(ConfigError) as info:
        train(_cfg(tmp_path, override))
    assert fragment in str(info.value)
    assert not (tmp_path / "mlflow.db").exists()


def test_unreachable_tracking_server_fails_within_seconds(tmp_path):
    started = time.monotonic()
    with pytest.raises(ConfigError, match="did not answer within 2 s"):
        train(_cfg(tmp_path, "tracking.uri=http://127.0.0.1:9", "tracking.timeout_s=2"))
    assert time.monotonic() - started < 15


def test_command_line_run_and_bad_input_exit_codes(tmp_path):
    cmd = [sys.executable, "-m", "cnnlab.cli", "train", *TINY, f"paths.runs={tmp_path}",
           "trainer.max_epochs=1", "tracking.log_model=false"]
    ok = subprocess.run(cmd, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    run_dir = tmp_path / "outputs" / "cnnlab"
    (job,) = [p for p in run_dir.iterdir() if p.is_dir()]
    assert (job / ".hydra" / "config.yaml").is_file() and (job / "curves.png").is_file()
    assert "epoch 1/1" in ok.stderr + ok.stdout  # the one-line epoch summary
    (run,) = _runs(tmp_path)
    assert "hydra" in {a.path for a in _client(tmp_path).list_artifacts(run.info.run_id)}
    bad = subprocess.run(cmd + ["model=nosuchmodel"], capture_output=True, text=True)
    assert bad.returncode != 0 and "nosuchmodel" in bad.stderr
    bad = subprocess.run(cmd + ["optim.lr=0"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: optim.lr")
    assert len(_runs(tmp_path)) == 1  # neither bad command created a run


def _tree(root: Path, classes=("cat", "dog"), size=16) -> Path:
    from PIL import Image

    for split in ("train", "test"):
        for index, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (size, size), (index * 100, i * 40, 0)).save(folder / f"{i}.png")
    return root


@pytest.mark.parametrize("damage, fragment", [
    (lambda t: (t / "train" / "dog" / "1.png").write_bytes(b"not an image"), "1.png"),
    (lambda t: [p.unlink() for p in (t / "test" / "dog").iterdir()] and (t / "test" / "dog").rmdir(),
     "dog"),
    (lambda t: [p.unlink() for p in (t / "train" / "cat").iterdir()], "cat"),
])
def test_bad_image_trees_fail_before_any_run(tmp_path, damage, fragment):
    tree = _tree(tmp_path / "tree")
    damage(tree)
    cfg = compose(["data=folder", f"data.root={tree}", "data.shape=[3,16,16]", "data.num_classes=2",
                   f"paths.runs={tmp_path / 'runs'}"])
    with pytest.raises(ConfigError) as info:
        train(cfg)
    assert fragment in str(info.value)
    assert not (tmp_path / "runs" / "mlflow.db").exists()


def test_folder_dataset_trains(tmp_path):
    tree = _tree(tmp_path / "tree")
    train(compose(["data=folder", f"data.root={tree}", "data.shape=[3,16,16]", "data.num_classes=2",
                   f"paths.runs={tmp_path / 'runs'}", "trainer.max_epochs=1", "tracking.log_model=false",
                   "model.widths=[2]", "model.dense=[4]", "trainer.enable_progress_bar=false"]))
    (run,) = _runs(tmp_path / "runs")
    assert run.info.status == "FINISHED" and run.data.params["data.name"] == "folder"
    assert str(tree) in run.data.params["data.source"]


def test_other_pixels_under_the_same_command_never_resume_its_run(tmp_path, caplog):
    """data.root is left out of run names, so the same command on another image tree found the
    first tree's run and took it as done. Now the run directory records its data's fingerprint: the
    other tree trains a separate run beside it, and the first tree still finds its own."""
    import logging

    first, second = _tree(tmp_path / "a"), _tree(tmp_path / "b")
    (second / "train" / "cat" / "0.png").unlink()  # other pixels: one image fewer
    from PIL import Image

    Image.new("RGB", (16, 16), (7, 7, 7)).save(second / "train" / "cat" / "0.png")

    def command(tree: Path) -> list[str]:
        return ["data=folder", f"data.root={tree}", "data.shape=[3,16,16]", "data.num_classes=2",
                f"paths.runs={tmp_path / 'runs'}", "trainer.max_epochs=1", "tracking.log_model=false",
                "model.widths=[2]", "model.dense=[4]", "trainer.enable_progress_bar=false"]

    a = train(compose(command(first)))
    with caplog.at_level(logging.WARNING, logger="cnnlab"):
        b = train(compose(command(second)))
    assert b.run_dir == a.run_dir.with_name(a.run_dir.name + "-data-" + b.run_dir.name.rsplit("-", 1)[1])
    assert "trained on other data" in caplog.text and str(b.run_dir) in caplog.text
    assert b.run_id != a.run_id and len(_runs(tmp_path / "runs")) == 2
    fingerprints = {r.info.run_id: r.data.tags["data.fingerprint"] for r in _runs(tmp_path / "runs")}
    assert fingerprints[a.run_id] != fingerprints[b.run_id]
    assert b.run_dir.name.endswith(fingerprints[b.run_id][:12])
    again = train(compose(command(first)))  # the first tree: its own finished run, nothing trained
    assert again.run_id == a.run_id and again.run_dir == a.run_dir and len(_runs(tmp_path / "runs")) == 2


def test_history_rows_reach_mlflow_once_even_after_a_kill(tmp_path):
    """A killed run may have written an epoch's row (and checkpoint) but not logged it: the
    next flush sends exactly the missing rows, and flushing again sends nothing."""
    from cnnlab.tracking.writer import Tracker
    from cnnlab.training.artifacts import write_history
    from cnnlab.training.epoch_log import EpochHistory

    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", tmp_path)
    tracker.start("flush", "r", tags={})
    rows = [{"epoch": e, "seconds": 1.0, "train/loss": 1.0 / e, "val/loss": 2.0 / e} for e in (1, 2, 3)]
    write_history(rows[:1], tmp_path / "history.jsonl")
    history = EpochHistory(tmp_path / "history.jsonl", tracker)
    history.flush()
    write_history(rows, tmp_path / "history.jsonl")  # epochs 2 and 3 written, then "killed"
    history.flush()
    history.flush()
    steps = [(m.step, m.value) for m in tracker.metric_history("train/loss")]
    assert sorted(steps) == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]


def test_throttled_step_metrics(tmp_path):
    train(_cfg(tmp_path, "trainer.max_epochs=1", "tracking.log_model=false", "tracking.step_metrics=true",
               "tracking.step_every=3"))
    (run,) = _runs(tmp_path)
    steps = [m.step for m in _client(tmp_path).get_metric_history(run.info.run_id, "train/loss_step")]
    assert steps == [3, 6]  # 8 batches of 32 from 256 synthetic images


def test_long_params_and_tags_are_never_cut_silently():
    from cnnlab.tracking.writer import MAX_PARAM_LENGTH, MAX_TAG_LENGTH, param_value, tag_value

    assert param_value("x" * (MAX_PARAM_LENGTH + 1)).startswith("(too long for an MLflow param: 6001")
    cut = tag_value("y" * 9000)
    assert len(cut) == MAX_TAG_LENGTH and cut.endswith("(cut: 9000 characters in all)")
    assert tag_value("short") == "short"


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_optimizer_implementations_make_the_same_updates(name):
    """optim.impl picks torch's loop, foreach or fused kernel: the speed differs, the update must not."""
    from cnnlab.training.optim import make_optimizer

    optim = dict(compose([f"optim={name}"]).optim)
    assert optim["impl"] == "fused"  # the default where benchmarks/optimizer_step.py shows it wins
    # Without BN: a bias right before BN gets a gradient of float noise only, which Adam scales
    # up to a full step, so implementations that sum in another order legitimately differ there.
    plan = model_plan(compose(["model.bn=false"]))
    torch.manual_seed(0)
    start = build(plan.analysis, logits=True)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    weights = {}
    for impl in ("loop", "foreach", "fused"):
        network = build(plan.analysis, logits=True)
        network.load_state_dict(start.state_dict())
        optimizer = make_optimizer(network.parameters(), {**optim, "impl": impl})
        assert bool(optimizer.defaults.get("fused")) is (impl == "fused")
        assert optimizer.defaults.get("foreach") is {"loop": False, "foreach": True, "fused": None}[impl]
        torch.manual_seed(1)  # the same dropout masks for each implementation
        for _ in range(3):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(network(x), y).backward()
            optimizer.step()
        weights[impl] = torch.cat([p.detach().flatten() for p in network.parameters()])
    assert not torch.equal(weights["loop"], torch.cat([p.flatten() for p in start.parameters()]))
    for impl in ("foreach", "fused"):
        torch.testing.assert_close(weights[impl], weights["loop"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("value", [True, False])
def test_trainer_benchmark_switch_reaches_cudnn(tmp_path, value):
    from cnnlab.training.trainer import make_trainer

    before = torch.backends.cudnn.benchmark
    try:
        make_trainer(_cfg(tmp_path, f"trainer.benchmark={str(value).lower()}"), tmp_path, [])
        assert torch.backends.cudnn.benchmark is value  # Lightning sets it when the Trainer is made
    finally:
        torch.backends.cudnn.benchmark = before


def test_last_checkpoint_follows_every_epoch_even_when_the_monitor_does_not_improve(tmp_path):
    """Lightning 2.6's save_last writes last.ckpt only in improving epochs; resuming must not go back."""
    train(_cfg(tmp_path, "trainer.max_epochs=3", "checkpoint.mode=max"))  # the highest val/loss: epoch 1
    (folder,) = (tmp_path / "outputs").glob("*/*/checkpoints")
    assert sorted(p.name for p in folder.iterdir()) == ["best.ckpt", "last.ckpt"]
    assert torch.load(folder / "best.ckpt", weights_only=True)["epoch"] == 0
    assert torch.load(folder / "last.ckpt", weights_only=True)["epoch"] == 2


def test_a_run_on_a_machine_without_cuda_devices_drops_lightnings_nvml_probe(tmp_path, monkeypatch):
    """`import lightning` sets PYTORCH_NVML_BASED_CUDA_CHECK=1, which makes every Adam step open the
    NVML library (cnnlab.training.trainer.cheap_cuda_probe): a run where no device is counted drops it;
    where one is, it stays."""
    import os

    from cnnlab.training.trainer import cheap_cuda_probe

    if torch.cuda.device_count():
        pytest.skip("this machine has a CUDA device")
    monkeypatch.setenv("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    train(_cfg(tmp_path, "trainer.max_epochs=1", "tracking.enabled=false"))
    assert "PYTORCH_NVML_BASED_CUDA_CHECK" not in os.environ
    monkeypatch.setenv("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    cheap_cuda_probe()
    assert os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] == "1"


def test_a_bf16_true_run_logs_a_float32_model_of_its_weights(tmp_path):
    """bf16-true trains bfloat16 weights; the logged model serves float32 images with those weights
    (before, logging fed a float32 example to bfloat16 weights and the finished run failed there)."""
    result = train(_cfg(tmp_path, "trainer.max_epochs=1", "trainer.precision=bf16-true", "tracking.log_model=true"))
    state = torch.load(result.run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert state["network.conv0.weight"].dtype == torch.bfloat16
    network = build(model_plan(_cfg(tmp_path)).analysis, logits=True)
    network.load_state_dict({k.removeprefix("network."): v.float() for k, v in state.items() if k.startswith("network.")})
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path.resolve()}/mlflow.db")
    logged = mlflow.pytorch.load_model(f"runs:/{result.run_id}/model")
    x = torch.rand(5, 3, 16, 16)
    torch.testing.assert_close(logged(x), torch.softmax(network.eval()(x), dim=1), rtol=1e-5, atol=1e-6)


def test_the_modules_fast_setattr_keeps_nn_modules_bookkeeping():
    """Classifier.__setattr__ stores plain values directly (Lightning sets ~35 a step); parameters,
    modules and tensors still go where nn.Module puts them, also under a name that held a plain value."""
    from cnnlab.training.module import Classifier

    module = Classifier(torch.nn.Linear(2, 2), dict(compose([]).optim), 2)
    module.note = "plain"
    module.note = 3
    assert module.__dict__["note"] == 3 and "note" not in module._modules
    module.note = torch.nn.Linear(2, 3)  # a module replaces the plain value
    assert "note" in module._modules and "note" not in module.__dict__
    module.scale = 1.0
    module.scale = torch.nn.Parameter(torch.ones(2))
    assert "scale" in module._parameters and "scale" not in module.__dict__
    assert {name for name, _ in module.named_parameters()} >= {"scale", "note.weight", "network.weight"}
