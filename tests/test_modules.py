"""Networks given as modules: torchvision models by name, registered factories (Python and entry
points), their measured plan, training, tracking and reproduction, and what cannot stack."""

import hashlib
import importlib
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import nn

import cnnlab
from cnnlab.cli import main as cli
from cnnlab.config.compose import compose
from cnnlab.errors import ConfigError
from cnnlab.model import registry
from cnnlab.model.plan import model_plan
from cnnlab.model.stacked import supports_stacking
from cnnlab.model.summary import summary_dict

TV = ["model=torchvision"]  # data=cifar10 (not loaded): 32x32x3, 10 classes


def _independent_counts(network: nn.Module, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(parameters, BatchNorm moving-statistic values, MACs per image) from a real CPU forward pass,
    with MACs from hooks on every Conv2d and Linear (not FlopCounterMode)."""
    macs = []

    def hook(module, inputs, output):
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            macs.append(output[0].numel() * kh * kw * module.in_channels // module.groups)
        else:
            macs.append(module.in_features * module.out_features)

    for m in network.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.register_forward_hook(hook)
    network.eval()
    with torch.no_grad():
        assert network(torch.zeros(1, *shape)).shape == (1, 10)  # logits for data=cifar10's classes
    moving = sum(m.running_mean.numel() * 2 for m in network.modules() if isinstance(m, nn.BatchNorm2d))
    return sum(p.numel() for p in network.parameters()), moving, sum(macs)


def test_summary_of_torchvision_resnet18_prints_its_parameter_count(capsys):
    assert cli(["summary", "model=torchvision", "model.arch=resnet18", "model.num_classes=10"]) == 0
    out = capsys.readouterr().out
    assert "PyTorch parameters: 11,181,642" in out
    import torchvision

    params, moving, macs = _independent_counts(torchvision.models.resnet18(num_classes=10), (3, 32, 32))
    assert params == 11_181_642
    assert f"Total params: {params + moving:,}" in out and f"Non-trainable params: {moving:,}" in out
    assert f"Total MACs: {macs:,}" in out
    assert "Receptive field: n/a" in out


def test_cifar_stem_replaces_conv1_and_the_max_pool():
    plan = model_plan(compose([*TV, "model.arch=resnet18", "model.cifar_stem=true"]))
    torch.manual_seed(0)
    network = plan.build()
    assert network.conv1.kernel_size == (3, 3) and network.conv1.stride == (1, 1)
    assert isinstance(network.maxpool, nn.Identity)
    params, moving, macs = _independent_counts(network, (3, 32, 32))
    assert (plan.torch_parameters, plan.non_trainable, plan.macs) == (params, moving, macs)
    assert plan.total_params == params + moving and plan.receptive_field is None
    assert summary_dict(plan)["macs"] == macs


@pytest.mark.parametrize("overrides, message", [
    (["model.arch=resnet181"], "not a torchvision classification model; did you mean resnet18"),
    (["model.arch=vgg11", "model.cifar_stem=true"], "archs that support it: resnet101, resnet152, resnet18"),
    (["model.num_classes=100"], "model.num_classes=100 but data.num_classes=10"),
    (["model.weights=IMAGENET9K"], "not a weights name of resnet18; allowed: null, DEFAULT, IMAGENET1K_V1"),
    (["model.arch=vit_b_16"], "model.arch=vit_b_16 does not run on a batch of data.shape=[3, 32, 32]"),
    (["model.cifar_stem=yes"], "model.cifar_stem must be true or false"),
])
def test_bad_torchvision_configs_are_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")) as error:
        model_plan(compose([*TV, *overrides]))
    assert "\n" not in str(error.value)


def test_pretrained_weights_come_only_from_the_hub_cache(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    with pytest.raises(ConfigError, match=f"looked for {expected}; cnnlab does not download"):
        model_plan(compose([*TV, "model.weights=DEFAULT"]))
    torch.manual_seed(1)
    imagenet = torchvision.models.resnet18()  # stands in for the downloaded file: 1000 classes
    expected.parent.mkdir(parents=True)
    torch.save(imagenet.state_dict(), expected)
    plan = model_plan(compose([*TV, "model.weights=ResNet18_Weights.IMAGENET1K_V1"]))
    network = plan.build()
    assert torch.equal(network.conv1.weight, imagenet.conv1.weight)
    assert torch.equal(network.layer4[1].bn2.running_var, imagenet.layer4[1].bn2.running_var)
    assert network.fc.out_features == 10 and network.fc.in_features == 512  # a fresh head for the data
    assert "weights=ResNet18_Weights.IMAGENET1K_V1" in plan.description


# ---------------------------------------------------------------------------------- registered

FACTORY = '''
from torch import nn


def make_tiny(num_classes, input_shape, width=4):
    return nn.Sequential(nn.Conv2d(input_shape[0], width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))
'''


@pytest.fixture
def tiny_factory(tmp_path, monkeypatch):
    """A factory in its own source file, registered as `tiny` (removed again afterwards)."""
    source = tmp_path / "tiny_module.py"
    source.write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("tiny_module")
    monkeypatch.setitem(registry._REGISTERED, "tiny", module.make_tiny)
    cnnlab.register_model("tiny", module.make_tiny)
    yield source
    sys.modules.pop("tiny_module", None)


def test_registered_plan_is_measured_and_named(tiny_factory):
    plan = model_plan(compose(["model=registered", "model.name=tiny", "model.args={width:6}", "data=synthetic"]))
    # synthetic data: 16x16x3, 4 classes; conv 3*6*9 + 6, BN gamma/beta 12 (+ 12 moving), dense 6*4 + 4
    assert (plan.trainable, plan.non_trainable, plan.torch_parameters) == (168 + 12 + 28, 12, 208)
    assert plan.macs == 16 * 16 * 6 * 27 + 24
    assert plan.source == (str(tiny_factory.resolve()), hashlib.sha256(tiny_factory.read_bytes()).hexdigest())
    assert plan.description == "registered tiny(4, (3, 16, 16), width=6)"
    ok, reason = supports_stacking(plan)
    assert not ok and "registered module" in reason and "\n" not in reason
    assert supports_stacking(model_plan(compose(["model=resnet", "data=synthetic"])))[0]


def test_registering_a_name_again_replaces_the_factory_a_run_would_train(tiny_factory):
    from cnnlab.training.checks import checked

    cfg = compose(["model=registered", "model.name=tiny", "data=synthetic"])
    first, _ = checked(cfg)
    assert checked(cfg)[0] is first  # checked once per config in a process ...
    cnnlab.register_model("tiny", lambda num_classes, input_shape: nn.Sequential(
        nn.Flatten(), nn.Linear(input_shape[0] * input_shape[1] * input_shape[2], num_classes)))
    again, _ = checked(cfg)  # ... unless the name now stands for another factory
    assert again.torch_parameters == 3 * 16 * 16 * 4 + 4 != first.torch_parameters


def test_registered_errors_are_one_line(tiny_factory):
    with pytest.raises(ConfigError, match=r"'nope' is not a registered model; registered: .*tiny"):
        model_plan(compose(["model=registered", "model.name=nope", "data=synthetic"]))
    with pytest.raises(ConfigError, match=r"could not be built: TypeError: .*unexpected keyword argument 'depth'"):
        model_plan(compose(["model=registered", "model.name=tiny", "model.args={depth:2}", "data=synthetic"]))
    with pytest.raises(ConfigError, match=r"\(B, 5\) logits \(data.num_classes=5\), got \[2, 10\]"):
        cnnlab.register_model("ten", lambda num_classes, input_shape: nn.Sequential(
            nn.Flatten(), nn.Linear(input_shape[0] * input_shape[1] * input_shape[2], 10)))
        try:
            model_plan(compose(["model=registered", "model.name=ten", "data=synthetic", "data.num_classes=5"]))
        finally:
            registry._REGISTERED.pop("ten")
    with pytest.raises(ConfigError, match="without spaces"):
        cnnlab.register_model("my net", lambda *a: None)


def test_an_entry_point_registers_a_factory(tmp_path, monkeypatch):
    (tmp_path / "ep_models.py").write_text(FACTORY)
    info = tmp_path / "ep_models-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-models\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[cnnlab.models]\nepnet = ep_models:make_tiny\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "epnet" in registry.registered_names()
    plan = model_plan(compose(["model=registered", "model.name=epnet", "data=synthetic"]))
    assert plan.torch_parameters == 3 * 4 * 9 + 4 + 8 + 4 * 4 + 4
    sys.modules.pop("ep_models", None)


def _train_tiny(runs: Path, uri: str):
    """One tracked epoch of the registered `tiny` on a little synthetic data, through the Python API
    (cnnlab.train); its config and MLflow run."""
    overrides = ["model=registered", "model.name=tiny", "model.args={width:4}", "data=synthetic",
                 "data.n_train=64", "data.n_test=32", "trainer.max_epochs=1", "trainer.accelerator=cpu",
                 "trainer.enable_progress_bar=false", "tracking.log_model=false", f"paths.runs={runs}",
                 f"tracking.uri={uri}"]
    result = cnnlab.train(overrides)
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert result.run_id == run.info.run_id
    return compose(overrides), run


def test_a_registered_module_trains_is_tracked_and_its_source_is_checked(tiny_factory, tmp_path, monkeypatch):
    from cnnlab.results.reproduce import reproduce
    from cnnlab.training.resume import check_checkpoint

    # A file store: creating a SQLite store's tables costs seconds; the SQLite path is test_train's.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    runs, uri = tmp_path / "runs", (tmp_path / "mlruns").as_uri()
    cfg, run = _train_tiny(runs, uri)
    params, tags = run.data.params, run.data.tags
    assert run.info.status == "FINISHED"
    total, macs = 3 * 4 * 9 + 4 + 16 + 20, 16 * 16 * 108 + 16
    assert (params["model.total_params"], params["model.macs"]) == (str(total), str(macs))
    assert "model.receptive_field" not in params and params["model.args.width"] == "4"
    assert params["model.layers_expanded"] == "registered tiny(4, (3, 16, 16), width=4)"
    assert tags["model.source_sha256"] == hashlib.sha256(tiny_factory.read_bytes()).hexdigest()
    assert tags["model.source_file"] == str(tiny_factory.resolve())
    # its own checkpoint is one of this network; another width's is not
    last = next(runs.glob("outputs/**/checkpoints/last.ckpt"))
    check_checkpoint(last, model_plan(cfg), {})
    wider = model_plan(compose(["model=registered", "model.name=tiny", "model.args={width:5}", "data=synthetic"]))
    with pytest.raises(ConfigError, match="holds another network: network.0.bias is"):
        check_checkpoint(last, wider, {})
    # the factory's file changed: reproduce refuses before training anything
    tiny_factory.write_text(FACTORY + "\n# edited\n")
    with pytest.raises(ConfigError, match=r"source .*tiny_module.py now hashes .*: the code changed"):
        reproduce(uri, run.info.run_id, runs)
    assert len(list(runs.glob("outputs/*/*"))) == 1  # no second run folder


@pytest.mark.slow
def test_a_registered_module_reproduces_identically(tiny_factory, tmp_path):
    from cnnlab.results.reproduce import reproduce

    runs = tmp_path / "runs"
    uri = f"sqlite:///{runs.resolve()}/mlflow.db"
    _, run = _train_tiny(runs, uri)
    result = reproduce(uri, run.info.run_id, runs)
    assert result.identical, result.text()


@pytest.mark.slow
def test_an_entry_point_model_sweeps_from_the_cli_and_compares_and_reports(tmp_path):
    """`cnnlab train -m model=registered ...` in a fresh process that knows the model only by its entry
    point; compare and report read the sweep."""
    import os
    import subprocess

    from cnnlab.results.compare import compare

    (tmp_path / "ep_models.py").write_text(FACTORY)
    info = tmp_path / "ep_models-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-models\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[cnnlab.models]\nepnet = ep_models:make_tiny\n")
    runs = tmp_path / "runs"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "cnnlab.cli", "train", "-m", "model=registered",
                           "model.name=epnet", "model.args={width:2},{width:6}", "seed=0,1", "data=synthetic",
                           "data.n_train=64", "data.n_test=32", "trainer.max_epochs=1", "trainer.accelerator=cpu",
                           "tracking.log_model=false", f"paths.runs={runs}"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    table = compare(f"sqlite:///{runs.resolve()}/mlflow.db", experiment="cnnlab").table.set_index("variant")
    assert list(table["n"]) == [2, 2]
    # width w: conv 27w + w, BN 2w (+ 2w moving), dense 4w + 4
    assert sorted(table["params"]) == [36 * 2 + 4, 36 * 6 + 4]
    assert sorted(table["MACs"]) == [16 * 16 * 27 * w + 4 * w for w in (2, 6)]
    assert cli(["report", "--runs", str(runs), "cnnlab"]) == 0


def test_the_readmes_register_model_example_registers_a_trainable_model(monkeypatch):
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "register_model(" in b]
    monkeypatch.setattr(registry, "_REGISTERED", {})
    exec(compile(block, "README.md", "exec"), {})
    plan = model_plan(compose(["model=registered", "model.name=mynet", "model.args={width:8}"]))
    assert plan.torch_parameters == 3 * 8 * 9 + 8 + 16 + 8 * 10 + 10  # conv, BN gamma/beta, dense on cifar10
