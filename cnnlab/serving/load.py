"""`load(run_id)`: a logged run's network, its input preprocessing and its class names.

Everything comes from what the run logged, never from today's conf/ or the dataset:
- the network is rebuilt from the run's `config.yaml` artifact (the resolved config, as
  `cnnlab reproduce` reads it) and given the weights of the checkpoint the run tested
  (`checkpoint.test`: best or last), in eval mode. It returns logits, as in training;
  `torch.softmax(logits, 1)` gives probabilities (Classifier.predict_step does the same);
- `preprocess` turns uint8 images (height, width, channels) into the network's input with
  cnnlab.data.normalize, the definition training's batches use;
- the class names are the run's `classes.json` artifact (the data's classes in label order).
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cnnlab.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from omegaconf import DictConfig
    from torch import nn

    from cnnlab.tracking.reader import Reader

log = logging.getLogger("cnnlab")


def store_uri(runs: str | Path = "runs") -> str:
    """A tracking URI as given (sqlite:///..., http://...), or the store under a runs root, which
    must exist."""
    from cnnlab.tracking.store import existing_store

    text = str(runs)
    return existing_store(text, text if "://" in text else None)


@dataclass(frozen=True)
class Preprocess:
    """uint8 images -> the network's input (N, C, H, W) float32, exactly as training fed it.

    Takes one image or a batch: a PIL image, a list of them, or a uint8 numpy array (or tensor)
    of shape (H, W, C), (H, W) for grayscale, or (N, H, W, C). PIL images are converted to RGB or
    grayscale ("L") by the network's channels, as training decoded image files; arrays must have
    the network's shape already.
    """

    shape: tuple[int, int, int]  # the network's input (C, H, W)
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C): what one input image looks like."""
        c, h, w = self.shape
        return h, w, c

    def __call__(self, images: Any) -> torch.Tensor:
        import torch

        from cnnlab.data.normalize import scale_and_normalize

        x = torch.from_numpy(self.batch(images)).permute(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
        return scale_and_normalize(x.contiguous(), self.mean, self.std)

    def batch(self, images: Any) -> Any:
        """The images as one uint8 numpy array (N, H, W, C), checked against the network's shape."""
        import numpy as np
        from PIL import Image

        if isinstance(images, Image.Image):
            images = [images]
        if isinstance(images, (list, tuple)):
            images = np.stack([self._array(image) for image in images])
        array = np.asarray(images.numpy() if hasattr(images, "numpy") else images)
        if array.dtype != np.uint8:
            raise ConfigError(f"images must be uint8 (0-255, as decoded from files), got {array.dtype}")
        if array.ndim == 2:  # one grayscale image
            array = array[None, :, :, None]
        elif array.ndim == 3:  # one image
            array = array[None]
        if array.ndim != 4 or tuple(array.shape[1:]) != self.image_shape:
            shape = "x".join(map(str, array.shape[1:] if array.ndim == 4 else array.shape))
            raise ConfigError(f"images of shape {shape} but the network takes "
                              f"{'x'.join(map(str, self.image_shape))} (height x width x channels)")
        return array

    def _array(self, image: Any) -> Any:
        import numpy as np
        from PIL import Image

        if isinstance(image, Image.Image):
            # As cnnlab.data.sources decodes files: RGB for 3 channels, "L" for 1.
            image = np.asarray(image.convert("RGB" if self.shape[0] == 3 else "L"))
        array = np.asarray(image)
        return array[:, :, None] if array.ndim == 2 else array


def preprocess_for(cfg: DictConfig) -> Preprocess:
    """The input preprocessing of a run's resolved config."""
    from cnnlab.config.compose import container
    from cnnlab.data.normalize import normalization

    data = container(cfg.data)
    mean, std = normalization(data)
    return Preprocess(tuple(data["shape"]), tuple(mean) if mean else None, tuple(std) if std else None)


def network_for(cfg: DictConfig) -> nn.Module:
    """The network a run's resolved config trains (logits out), freshly initialised: the layer language's
    or an opaque module's (a registered factory must be registered in this process, or an entry point).
    Pretrained torchvision weights are not read: the run's checkpoint replaces every value."""
    from cnnlab.model.plan import model_plan

    return model_plan(cfg).build(pretrained=False)


@dataclass
class LoadedRun:
    run_id: str
    config: DictConfig  # the run's resolved config (its config.yaml)
    network: nn.Module
    preprocess: Preprocess
    classes: list[str]
    checkpoint: str  # the artifact the weights came from


def run_config(reader: Reader, run_id: str) -> DictConfig:
    from omegaconf import OmegaConf

    reader.run(run_id)  # an unknown id: one line naming it and the store
    if "config.yaml" not in reader.artifact_names(run_id):
        raise ConfigError(f"run {run_id} has no logged config (config.yaml artifact); only runs "
                          f"trained by cnnlab train can be loaded")
    cfg = OmegaConf.create(reader.read_text(run_id, "config.yaml"))
    OmegaConf.set_struct(cfg, True)  # an override of a key the run did not have is an error
    return cfg


def tested_checkpoint(cfg: DictConfig) -> str:
    """The checkpoint artifact whose weights test/* scored (cnnlab.training.run)."""
    return f"checkpoints/{cfg.checkpoint.test}.ckpt"


def load_weights(reader: Reader, run_id: str, name: str) -> dict[str, torch.Tensor]:
    """The network's state dict from a logged Lightning checkpoint (the Classifier's `network.`)."""
    import torch

    if name not in reader.artifact_names(run_id, "checkpoints"):
        raise ConfigError(f"run {run_id} has no {name} artifact (the checkpoint it tested); "
                          f"was it trained with tracking on and did it finish?")
    with tempfile.TemporaryDirectory() as tmp:
        path = reader.client.download_artifacts(run_id, name, tmp)
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    prefix = "network."
    return {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}


def run_classes(reader: Reader, run_id: str, num_classes: int) -> list[str]:
    """The class names logged with the run; runs from before classes.json get their label numbers."""
    from cnnlab.training.artifacts import CLASSES_FILE

    if CLASSES_FILE not in reader.artifact_names(run_id):
        log.warning("run %s has no %s (trained before cnnlab logged class names); classes are "
                    "shown as their label numbers", run_id, CLASSES_FILE)
        return [str(i) for i in range(num_classes)]
    return list(json.loads(reader.read_text(run_id, CLASSES_FILE)))


def load_run(reader: Reader, run_id: str) -> LoadedRun:
    cfg = run_config(reader, run_id)
    network = network_for(cfg)
    checkpoint = tested_checkpoint(cfg)
    network.load_state_dict(load_weights(reader, run_id, checkpoint))
    network.eval()
    classes = run_classes(reader, run_id, int(cfg.data.num_classes))
    return LoadedRun(run_id, cfg, network, preprocess_for(cfg), classes, checkpoint)


def load(run_id: str, runs: str | Path = "runs") -> tuple[nn.Module, Preprocess, list[str]]:
    """(network, preprocess, class names) of a logged run.

    `runs` is a runs root holding mlflow.db (default `runs`) or a tracking URI. The network is
    in eval mode and returns logits: `torch.softmax(network(preprocess(images)), 1)` are the
    class probabilities, in the order of the class names.
    """
    from cnnlab.tracking.reader import Reader

    loaded = load_run(Reader(store_uri(runs)), run_id)
    return loaded.network, loaded.preprocess, loaded.classes
