"""The run's model for serving: an MLflow pyfunc model that takes uint8 images and returns
class names and probabilities.

`mlflow.pyfunc.load_model("runs:/<id>/classifier").predict(images)` takes a uint8 array
(N, H, W, C), as images decode from files, and returns a DataFrame: `class` (the predicted
class name) and one `prob_<class name>` column per class. The raw network (pt2, pre-scaled
NCHW floats in) stays logged as `model` for fine-tuning (cnnlab.training.artifacts).

The model is the run's config, its network's weights (a state dict: no pickle) and its class
names, plus cnnlab's own code (`code_paths`), which rebuilds the network and preprocesses
exactly as cnnlab.serving.load does: so it loads anywhere torch, torchvision, omegaconf,
pandas and MLflow are installed.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow.pyfunc
import numpy as np

if TYPE_CHECKING:
    import pandas as pd
    import torch
    from torch import nn

MODEL_NAME = "classifier"  # the artifact path: runs:/<id>/classifier
CLASS_COLUMN = "class"
PROBABILITY_PREFIX = "prob_"


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """uint8 images (N, H, W, C) -> predicted class name and one probability column per class."""

    def load_context(self, context) -> None:
        import torch
        from omegaconf import OmegaConf

        from cnnlab.serving.load import network_for, preprocess_for

        cfg = OmegaConf.create(Path(context.artifacts["config"]).read_text())
        self.network = network_for(cfg)
        self.network.load_state_dict(torch.load(context.artifacts["weights"], map_location="cpu",
                                                weights_only=True))
        self.network.eval()
        self.preprocess = preprocess_for(cfg)
        self.classes = json.loads(Path(context.artifacts["classes"]).read_text())

    # np.ndarray: a hint MLflow knows and leaves to the signature (uint8, (-1, H, W, C)) to check.
    def predict(self, context, model_input: np.ndarray, params=None):  # -> pd.DataFrame
        import torch

        with torch.inference_mode():
            probabilities = torch.softmax(self.network(self.preprocess(model_input)), dim=1)
        return prediction_frame(probabilities, self.classes)


def prediction_frame(probabilities: torch.Tensor, classes: list[str]) -> pd.DataFrame:
    import pandas as pd

    columns = {CLASS_COLUMN: [classes[i] for i in probabilities.argmax(dim=1).tolist()]}
    columns.update({f"{PROBABILITY_PREFIX}{name}": probabilities[:, i].double().numpy()
                    for i, name in enumerate(classes)})
    return pd.DataFrame(columns)


def signature(image_shape: tuple[int, int, int], classes: list[str]):
    """uint8 (-1, H, W, C) in; the class name and a float64 per class out."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    inputs = Schema([TensorSpec(np.dtype(np.uint8), (-1, *image_shape))])
    outputs = Schema([ColSpec("string", CLASS_COLUMN),
                      *(ColSpec("double", f"{PROBABILITY_PREFIX}{name}") for name in classes)])
    return ModelSignature(inputs=inputs, outputs=outputs)


def requirements() -> list[str]:
    """Given, not inferred: inference costs seconds per run (MLflow loads the model to find them)."""
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}"
            for name in ("mlflow", "torch", "torchvision", "omegaconf", "pandas", "numpy", "pillow")]


def log_pyfunc_model(tracker, network: nn.Module, config_yaml: str, classes: list[str],
                     example: Any) -> None:
    """Log the classifier to the tracker's run. `example`: a few uint8 images (N, H, W, C)."""
    import mlflow
    import torch

    import cnnlab

    with tempfile.TemporaryDirectory() as tmp:
        files = {"config": Path(tmp) / "config.yaml", "weights": Path(tmp) / "weights.pt",
                 "classes": Path(tmp) / "classes.json"}
        files["config"].write_text(config_yaml)
        torch.save({k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()},
                   files["weights"])
        files["classes"].write_text(json.dumps(list(classes)))
        mlflow.set_tracking_uri(tracker.uri)
        with mlflow.start_run(run_id=tracker.run_id):
            mlflow.pyfunc.log_model(
                # A file, not an object: MLflow runs it to get the model, nothing is pickled.
                name=MODEL_NAME, python_model=str(Path(__file__).with_name("classifier_model.py")),
                artifacts={key: str(path) for key, path in files.items()},
                code_paths=[str(Path(cnnlab.__file__).parent)],
                signature=signature(tuple(example.shape[1:]), classes), input_example=example,
                pip_requirements=requirements())
