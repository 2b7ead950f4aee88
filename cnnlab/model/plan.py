"""A model config -> its plan: everything the rest of cnnlab needs to know about the network
before training, for every kind of model.

Two kinds, one plan:

* the layer language (explicit `layers`, a family, `resnet`): specs and their Analysis, derived
  from the tokens without torch (cnnlab.model.shapes), built by cnnlab.model.build;
* opaque modules (`torchvision`, `registered`): a factory and what a meta-device forward pass
  measured (cnnlab.model.modules); no tokens and no receptive field.

run.py, summary, checkpoints and logging read the plan's common properties (name, params,
MACs, receptive field or None, description, build()) and never ask which kind it is.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cnnlab.config.compose import container
from cnnlab.model.family import model_specs
from cnnlab.model.shapes import Analysis, analyse, check_classifier
from cnnlab.model.spec import LayerSpec, to_token

OPAQUE_KINDS = ("torchvision", "registered")


@dataclass(frozen=True)
class ModelPlan:
    """Everything known about the network before training. Layer-language plans have `specs`
    and `analysis`; opaque ones have `module` (cnnlab.model.modules.OpaqueModel)."""

    name: str
    specs: list[LayerSpec]
    analysis: Analysis | None
    options: Mapping[str, Any] = field(default_factory=dict)  # build()'s init, bn_momentum, bn_eps
    module: Any = None
    input_shape: tuple[int, ...] = ()

    @property
    def kind(self) -> str:
        return "layers" if self.module is None else self.module.kind

    @property
    def tokens(self) -> list[str]:
        return [to_token(spec) for spec in self.specs]

    @property
    def description(self) -> str:
        """One line saying what is built: the expanded tokens, or the module and its arguments."""
        return " ".join(self.tokens) if self.module is None else self.module.description

    @property
    def trainable(self) -> int:
        return self.analysis.trainable if self.module is None else self.module.counts.trainable

    @property
    def non_trainable(self) -> int:
        """Keras's non-trainable weights: BatchNorm's moving statistics (and frozen parameters)."""
        return self.analysis.non_trainable if self.module is None else self.module.counts.non_trainable

    @property
    def total_params(self) -> int:
        return self.trainable + self.non_trainable

    @property
    def torch_parameters(self) -> int:
        return self.analysis.trainable if self.module is None else self.module.counts.torch_parameters

    @property
    def macs(self) -> int:
        return self.analysis.macs if self.module is None else self.module.counts.macs

    @property
    def receptive_field(self) -> int | None:
        """The receptive field's size in pixels (first axis), or None for an opaque module."""
        return self.analysis.receptive_field.size[0] if self.module is None else None

    @property
    def output_shape(self) -> tuple[int, ...]:
        return self.analysis.output_shape if self.module is None else self.module.counts.output_shape

    @property
    def ends_in_softmax(self) -> bool:
        """Whether prediction applies a softmax the training network leaves out (build(logits=True))."""
        from cnnlab.model.build import ends_in_softmax

        return self.module is None and ends_in_softmax(self.analysis)

    @property
    def source(self) -> tuple[str, str] | None:
        """(file, sha256) of a registered factory's source, which reproduce checks."""
        return None if self.module is None else self.module.source

    def build(self, pretrained: bool = True):
        """A fresh network that returns logits, initialised from torch's global generator (seed first);
        pretrained=False leaves a torchvision model's pretrained weights unread (shapes only)."""
        if self.module is not None:
            return self.module.make(pretrained)
        from cnnlab.model.build import build

        return build(self.analysis, self.options.get("init", "keras"), self.options.get("bn_momentum", 0.99),
                     self.options.get("bn_eps", 1e-3), logits=True)


def model_plan(cfg: Any) -> ModelPlan:
    """Parse, expand and analyse the model for the data's input shape (data.shape and
    data.num_classes as cnnlab.config.schema checks them); fail fast, naming the layer."""
    model, data = container(cfg.model), container(cfg.data)
    from cnnlab.config.schema import DATA

    for key in ("shape", "num_classes"):  # summary composes without the run's other checks
        DATA.fields[key].check(f"data.{key}", data.get(key))
    shape, classes = tuple(data["shape"]), data["num_classes"]
    if "arch" in model or "args" in model:  # the opaque kinds' own keys (cnnlab.config.schema)
        from cnnlab.config.schema import MODEL_REGISTERED, MODEL_TORCHVISION
        from cnnlab.model.modules import registered_model, torchvision_model

        if "arch" in model:
            MODEL_TORCHVISION.check(model)
            module = torchvision_model(model, shape, classes)
            name = f"{model['arch']}"
        else:
            MODEL_REGISTERED.check(model)
            module = registered_model(model, shape, classes)
            name = str(model["name"])
        return ModelPlan(name, [], None, {}, module, shape)
    specs = model_specs(model, classes)
    analysis = analyse(specs, shape)
    check_classifier(analysis, classes)
    options = {k: model[k] for k in ("init", "bn_momentum", "bn_eps") if k in model}
    return ModelPlan(str(model.get("name", "model")), specs, analysis, options, None, shape)
