"""A model config -> its plan: the layer specs and their analysis, before a tensor exists."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cnnlab.config.compose import container
from cnnlab.model.family import model_specs
from cnnlab.model.shapes import Analysis, analyse, check_classifier
from cnnlab.model.spec import LayerSpec, to_token


@dataclass(frozen=True)
class ModelPlan:
    """Everything known about the network before a tensor exists."""

    name: str
    specs: list[LayerSpec]
    analysis: Analysis

    @property
    def tokens(self) -> list[str]:
        return [to_token(spec) for spec in self.specs]


def model_plan(cfg: Any) -> ModelPlan:
    """Parse, expand and analyse the model for the data's input shape (data.shape and
    data.num_classes as cnnlab.config.schema checks them); fail fast, naming the layer."""
    model, data = container(cfg.model), container(cfg.data)
    from cnnlab.config.schema import DATA

    for key in ("shape", "num_classes"):  # summary composes without the run's other checks
        DATA.fields[key].check(f"data.{key}", data.get(key))
    specs = model_specs(model, data["num_classes"])
    analysis = analyse(specs, tuple(data["shape"]))
    check_classifier(analysis, data["num_classes"])
    return ModelPlan(str(model.get("name", "model")), specs, analysis)
