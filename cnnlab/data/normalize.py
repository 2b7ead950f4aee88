"""How pixels become the network's input: the one definition, shared by training's batches
(cnnlab.data.batches) and serving (cnnlab.serving.load). No Lightning import, so a served
model needs only torch and torchvision."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torchvision.transforms.v2 import functional as TF


def normalization(cfg: Mapping[str, Any]) -> tuple[list[float] | None, list[float] | None]:
    """(mean, std) a checked data config standardises with; (None, None) for plain x/255."""
    if cfg["normalize"] != "standardize":
        return None, None
    return list(cfg["mean"]), list(cfg["std"])


def scale_and_normalize(x: torch.Tensor, mean: Sequence[float] | None,
                        std: Sequence[float] | None) -> torch.Tensor:
    """uint8 (..., C, H, W) -> float32 x/255, then (x - mean)/std when mean is given."""
    x = TF.to_dtype(x, torch.float32, scale=True)
    return x if mean is None else TF.normalize(x, list(mean), list(std))
