"""`cnnlab predict RUN_ID IMAGE...`: the top-k classes of image files, with probabilities.

Files are decoded as training decoded image trees (cnnlab.data.sources): RGB or grayscale by
the network's channels. Every file is read and checked before the network runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cnnlab.errors import ConfigError
from cnnlab.serving.load import LoadedRun


@dataclass
class Prediction:
    path: str
    top: list[tuple[str, float]]  # (class name, probability), most probable first

    def text(self) -> str:
        return f"{self.path}: " + ", ".join(f"{name} {p:.4f}" for name, p in self.top)


def read_images(paths: list[str], loaded: LoadedRun):
    """(N, H, W, C) uint8: every file decoded and checked against the network's input shape."""
    import numpy as np

    # The decoder training used for image trees; private there, shared so files decode alike.
    from cnnlab.data.sources import DecoderMessages, decode_image

    expected = "x".join(map(str, loaded.preprocess.image_shape))
    wanted = f"the run's network takes {expected} (height x width x channels)"
    images = []
    with DecoderMessages() as messages:  # the size in the header is checked first; a corrupt file is refused
        for path in paths:
            try:
                raw = Path(path).read_bytes()
            except OSError as error:
                raise ConfigError(f"cannot read image {path}: {error.strerror}") from None
            image = decode_image(raw, path, tuple(loaded.preprocess.shape), messages, wanted)
            image = image.permute(1, 2, 0).numpy()  # (H, W, C)
            if image.shape != loaded.preprocess.image_shape:
                raise ConfigError(f"image {path} is {'x'.join(map(str, image.shape))} but {wanted}")
            images.append(image)
    return np.stack(images)


def predict(loaded: LoadedRun, paths: list[str], top_k: int = 1) -> list[Prediction]:
    import torch

    k = len(loaded.classes)
    if not 1 <= top_k <= k:
        raise ConfigError(f"--top-k {top_k} is not in 1..{k} (the run's classes)")
    images = read_images(paths, loaded)
    with torch.inference_mode():
        probabilities = torch.softmax(loaded.network(loaded.preprocess(images)), dim=1)
    values, indices = probabilities.topk(top_k, dim=1)
    return [Prediction(path, [(loaded.classes[i], float(p)) for p, i in zip(row_p.tolist(), row_i.tolist())])
            for path, row_p, row_i in zip(paths, values, indices)]
