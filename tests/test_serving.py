"""Serving a trained run: cnnlab.load, `cnnlab evaluate`, `cnnlab predict` and the pyfunc
classifier, on one tiny synthetic run trained once for the module."""

import re
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

import cnnlab
from cnnlab.cli import main
from cnnlab.config.compose import compose, container
from cnnlab.data.batches import TensorDataModule
from cnnlab.data.sources import load_dataset
from cnnlab.errors import ConfigError
from cnnlab.serving.evaluate import figures
from cnnlab.serving.load import Preprocess
from cnnlab.train import train

# Two epochs, and the "best" checkpoint is the one with the highest val/loss (the first epoch, as the
# loss falls), which the run tests: so the tested weights are not the last ones, and serving the
# last ones by mistake shows.
TINY = ["data=synthetic", "model=baseline", "model.widths=[4]", "model.dense=[8]", "data.n_train=64",
        "data.n_test=32", "data.normalize=standardize", "trainer.max_epochs=2", "checkpoint.test=best",
        "checkpoint.monitor=val/loss", "checkpoint.mode=max", "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false", "seed=5"]
CLASSES = ["class0", "class1", "class2", "class3"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(runs root, the finished MLflow run, its composed config, its data)."""
    runs = tmp_path_factory.mktemp("runs")
    cfg = compose([*TINY, f"paths.runs={runs}"])
    train(cfg)
    client = MlflowClient(f"sqlite:///{runs}/mlflow.db")
    (found,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    data = load_dataset(container(cfg.data), Path(cfg.paths.cache), cfg.seed)
    return runs, found, cfg, data


@pytest.fixture(scope="module")
def loaded(run):
    runs, found, *_ = run
    return cnnlab.load(found.info.run_id, runs)


def _hwc(x: torch.Tensor) -> np.ndarray:
    return x.permute(0, 2, 3, 1).numpy()  # (N, C, H, W) -> (N, H, W, C)


def _probabilities(loaded, images) -> torch.Tensor:
    network, preprocess, _ = loaded
    with torch.no_grad():
        return torch.softmax(network(preprocess(images)), dim=1)


# --------------------------------------------------------------------------- load


def test_load_gives_the_tested_weights_in_eval_mode_and_the_class_names(run, loaded):
    runs, found, cfg, _ = run
    network, _, classes = loaded
    assert classes == CLASSES and not network.training
    # checkpoint.test=best: the weights of the run folder's best.ckpt, read here directly, not last.ckpt's.
    (best,) = runs.glob("outputs/**/checkpoints/best.ckpt")
    (last,) = runs.glob("outputs/**/checkpoints/last.ckpt")
    saved, other = (torch.load(path, weights_only=True)["state_dict"] for path in (best, last))
    state = network.state_dict()
    assert state.keys() == {k.removeprefix("network.") for k in saved if k.startswith("network.")}
    assert all(torch.equal(state[k], saved[f"network.{k}"]) for k in state)
    assert not all(torch.equal(state[k], other[f"network.{k}"]) for k in state)


def test_preprocess_feeds_the_network_exactly_what_training_fed_it(run, loaded):
    _, _, cfg, data = run
    module = TensorDataModule(data, container(cfg.data), cfg.seed)
    (trained_batch, _), = list(module.test_dataloader())  # 32 images, eval batch 64: one batch
    served = loaded[1](_hwc(data.test_x))
    assert torch.equal(served, trained_batch)
    # standardize is on: the input is not plain x/255
    assert not torch.allclose(served, data.test_x.float() / 255)


def test_load_accepts_a_tracking_uri_and_refuses_an_unknown_run(run):
    runs, found, *_ = run
    _, _, classes = cnnlab.load(found.info.run_id, f"sqlite:///{runs}/mlflow.db")
    assert classes == CLASSES
    with pytest.raises(ConfigError, match="no MLflow run '0123456789abcdef0123456789abcdef'"):
        cnnlab.load("0123456789abcdef0123456789abcdef", runs)
    with pytest.raises(ConfigError, match="no MLflow store"):
        cnnlab.load(found.info.run_id, runs / "elsewhere")


def test_preprocess_takes_pil_images_and_refuses_wrong_inputs():
    preprocess = Preprocess((3, 4, 5), None, None)
    gray = np.arange(20, dtype=np.uint8).reshape(4, 5)
    # A grayscale PIL image for an RGB network: converted as training decoded files (PIL "RGB").
    x = preprocess(Image.fromarray(gray))
    assert x.shape == (1, 3, 4, 5) and torch.equal(x[0, 0], x[0, 2])
    assert torch.allclose(x[0, 1], torch.from_numpy(gray).float() / 255)
    assert preprocess([Image.fromarray(gray)] * 2).shape == (2, 3, 4, 5)
    with pytest.raises(ConfigError, match="images of shape 5x4x3 but the network takes 4x5x3"):
        preprocess(np.zeros((5, 4, 3), np.uint8))
    with pytest.raises(ConfigError, match="must be uint8 .* got float32"):
        preprocess(np.zeros((4, 5, 3), np.float32))


def test_import_cnnlab_stays_light():
    code = "import sys, cnnlab; assert 'load' in dir(cnnlab); print(sorted({'torch', 'mlflow'} & set(sys.modules)))"
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert shown.strip() == "[]"


# --------------------------------------------------------------------------- evaluate


def test_figures_agree_with_numpy_on_known_predictions():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 4, 50)
    right = (rng.random(50) < 0.6) & (target != 3)
    predicted = np.where(right, target, rng.integers(0, 3, 50))  # class 3 is never predicted
    result = figures(torch.from_numpy(predicted), torch.from_numpy(target), CLASSES, "r", "s")
    confusion = np.zeros((4, 4), int)
    np.add.at(confusion, (target, predicted), 1)
    diagonal, predicted_per_class, support = np.diag(confusion), confusion.sum(0), confusion.sum(1)
    assert result.confusion == confusion.tolist() and result.support == support.tolist()
    assert result.accuracy == pytest.approx(np.mean(predicted == target))
    assert result.recall == pytest.approx(diagonal / support)
    precision = np.divide(diagonal, predicted_per_class, out=np.zeros(4), where=predicted_per_class > 0)
    assert predicted_per_class[3] == 0 and result.precision == pytest.approx(precision)
    assert "(a class never predicted has precision 0)" in result.text()


def test_evaluate_scores_the_test_split_as_the_run_did_and_logs_the_figures(run, loaded, tmp_path, capsys):
    runs, found, _, data = run
    run_id = found.info.run_id
    assert main(["evaluate", run_id, "--runs", str(runs), "--out", str(tmp_path)]) == 0
    shown = capsys.readouterr().out
    predicted = _probabilities(loaded, _hwc(data.test_x)).argmax(1).numpy()
    accuracy = float(np.mean(predicted == data.test_y.numpy()))
    assert accuracy == pytest.approx(found.data.metrics["test/acc"])  # what the run's test scored
    assert f"accuracy {accuracy:.4f}" in shown
    confusion = pd.read_csv(tmp_path / "confusion_matrix.csv", index_col=0)
    expected = np.zeros((4, 4), int)
    np.add.at(expected, (data.test_y.numpy(), predicted), 1)
    assert list(confusion.columns) == CLASSES and (confusion.to_numpy() == expected).all()
    assert (tmp_path / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    client = MlflowClient(f"sqlite:///{runs}/mlflow.db")
    assert {a.path for a in client.list_artifacts(run_id, "evaluate")} == {
        "evaluate/confusion_matrix.csv", "evaluate/confusion_matrix.png", "evaluate/per_class.csv"}
    assert client.get_run(run_id).data.metrics["evaluate/acc"] == pytest.approx(accuracy)


def test_evaluate_on_other_data_of_the_same_task(run, tmp_path, capsys):
    runs, found, *_ = run
    assert main(["evaluate", found.info.run_id, "data.n_test=8", "--runs", str(runs),
                 "--out", str(tmp_path)]) == 0
    assert "on 8 images of synthetic" in capsys.readouterr().out
    per_class = pd.read_csv(tmp_path / "per_class.csv")
    assert per_class["support"].sum() == 8
    client = MlflowClient(f"sqlite:///{runs}/mlflow.db")
    assert "evaluate/data.n_test=8" in {a.path for a in client.list_artifacts(found.info.run_id, "evaluate")}


@pytest.mark.parametrize("override, message", [
    ("data.shape=[1,16,16]", re.escape("data synthetic has shape [1, 16, 16] and 4 classes but the run's network "
                                       "was trained on synthetic: shape [3, 16, 16], 4 classes")),
    ("data.num_classes=3", r"has shape \[3, 16, 16\] and 3 classes but .* shape \[3, 16, 16\], 4 classes"),
    ("optim.lr=0.1", "evaluate takes data overrides only .* got 'optim.lr=0.1'"),
], ids=["shape", "classes", "not-data"])
def test_evaluate_refuses_data_of_another_task(run, override, message, capsys):
    runs, found, *_ = run
    assert main(["evaluate", found.info.run_id, override, "--runs", str(runs)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(message, err), err


# --------------------------------------------------------------------------- predict


def test_predict_gives_the_networks_top_classes_for_image_files(run, loaded, tmp_path, capsys):
    runs, found, _, data = run
    images = _hwc(data.test_x[:3])
    paths = []
    for i, image in enumerate(images):
        paths.append(str(tmp_path / f"test{i}.png"))
        Image.fromarray(image).save(paths[-1])
    assert main(["predict", found.info.run_id, *paths, "--top-k", "2", "--runs", str(runs)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    probabilities = _probabilities(loaded, images)
    for path, line, row in zip(paths, lines, probabilities):
        top = row.argsort(descending=True)[:2].tolist()
        assert line == f"{path}: " + ", ".join(f"{CLASSES[i]} {row[i]:.4f}" for i in top)


def test_predict_refuses_bad_files_naming_them(run, tmp_path, capsys):
    runs, found, *_ = run
    garbage, small, missing = tmp_path / "garbage.png", tmp_path / "small.png", tmp_path / "missing.png"
    garbage.write_bytes(b"not an image")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(small)
    for path, message in ((garbage, f"cannot decode image {garbage}"),
                          (small, f"image {small} declares 8x8 pixels (width x height) in its header but "
                                  "the run's network takes 16x16x3"),
                          (missing, f"cannot read image {missing}: No such file")):
        assert main(["predict", found.info.run_id, str(path), "--runs", str(runs)]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert main(["predict", found.info.run_id, str(small), "--top-k", "5", "--runs", str(runs)]) == 2
    assert "--top-k 5 is not in 1..4" in capsys.readouterr().err
    assert main(["predict", "0123456789abcdef0123456789abcdef", str(small), "--runs", str(runs)]) == 2
    assert "no MLflow run" in capsys.readouterr().err


# --------------------------------------------------------------------------- the pyfunc model


def test_the_pyfunc_classifier_takes_uint8_images_and_matches_the_network(run, loaded):
    runs, found, _, data = run
    mlflow.set_tracking_uri(f"sqlite:///{runs}/mlflow.db")
    model = mlflow.pyfunc.load_model(f"runs:/{found.info.run_id}/classifier")
    (spec,) = model.metadata.signature.inputs.inputs
    assert spec.type == np.dtype(np.uint8) and spec.shape == (-1, 16, 16, 3)
    assert model.metadata.saved_input_example_info["type"] == "ndarray"
    images = _hwc(data.test_x)
    frame = model.predict(images)
    probabilities = _probabilities(loaded, images).double().numpy()
    assert list(frame.columns) == ["class", *(f"prob_{c}" for c in CLASSES)]
    assert np.allclose(frame[[f"prob_{c}" for c in CLASSES]].to_numpy(), probabilities, atol=1e-6)
    assert frame["class"].tolist() == [CLASSES[i] for i in probabilities.argmax(1)]
    with pytest.raises(mlflow.exceptions.MlflowException):  # the signature: uint8 only
        model.predict(images.astype(np.float32))
