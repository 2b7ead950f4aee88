"""Networks cnnlab does not write in its layer language: torchvision classification models by
name (`model=torchvision model.arch=resnet18`) and registered factories (`model=registered
model.name=mynet`, cnnlab.model.registry).

Their plan is measured, not derived from specs: the module is built on the meta device (no
memory, no weights), one forward pass of a batch of 2 runs under
`torch.utils.flop_counter.FlopCounterMode`, and the counts follow shapes.py's conventions:

* MACs = FLOPs / 2 of what FlopCounterMode counts (convolutions, mm, addmm, bmm, attention),
  per image; the layer language counts exactly these too;
* trainable = parameters with requires_grad; non-trainable = frozen parameters plus BatchNorm's
  moving mean and variance (buffers in PyTorch, non-trainable weights in Keras, as the layer
  language counts them); PyTorch's own parameter count is listed beside them;
* the receptive field is not computed (None, shown as n/a): the module is opaque.

Pretrained torchvision weights are read only from the local torch hub cache
(torch.hub.get_dir()/checkpoints): cnnlab never downloads at run time.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cnnlab.errors import ConfigError

PROBE_BATCH = 2  # BatchNorm in training mode needs more than one value per channel


@dataclass(frozen=True)
class ModuleCounts:
    """What a meta-device forward pass measured."""

    output_shape: tuple[int, ...]
    trainable: int
    non_trainable: int
    torch_parameters: int
    macs: int
    children: list[tuple[str, str, int, int]]  # top-level child: name, class, params, MACs


@dataclass(frozen=True)
class OpaqueModel:
    """A network given as a module factory: how to build it, and what was measured."""

    kind: str                               # torchvision | registered
    description: str                        # one line: what is built (its args, weights, stem)
    make: Callable[[bool], Any] = field(repr=False)  # make(pretrained) -> nn.Module giving logits
    counts: ModuleCounts
    source: tuple[str, str] | None = None   # (file, sha256) of a registered factory's source
    class_name: str = ""
    factory: Any = field(default=None, repr=False)  # a registered model's factory, as found when planned


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:300]}" if text else type(error).__name__


def measure(make: Callable[[bool], Any], input_shape: tuple[int, ...], num_classes: int,
            what: str) -> tuple[ModuleCounts, str]:
    """Build on the meta device, run one forward pass under FlopCounterMode, count; one line when
    the module cannot be built, cannot take this input, or does not give (B, num_classes) logits."""
    import torch
    from torch import nn
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with torch.device("meta"):
            network = make(False)
    except ConfigError:
        raise
    except Exception as error:  # a factory raises whatever its code raises
        raise ConfigError(f"{what} could not be built: {_first_line(error)}") from error
    if not isinstance(network, nn.Module):
        raise ConfigError(f"{what} must build a torch.nn.Module, got {type(network).__name__}")
    network.train()
    x = torch.empty(PROBE_BATCH, *input_shape, device="meta")
    try:
        with FlopCounterMode(display=False) as counter:
            y = network(x)
    except Exception as error:  # shape mismatches surface as RuntimeError, ValueError, IndexError ...
        raise ConfigError(f"{what} does not run on a batch of data.shape={list(input_shape)} "
                          f"(a forward pass on the meta device): {_first_line(error)}") from error
    if not isinstance(y, torch.Tensor) or tuple(y.shape) != (PROBE_BATCH, num_classes):
        got = list(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ConfigError(f"{what} must map a (B, C, H, W) batch to (B, {num_classes}) logits "
                          f"(data.num_classes={num_classes}), got {got} for B={PROBE_BATCH}")
    flops = counter.get_flop_counts()
    root = type(network).__name__

    def counts(module: nn.Module) -> tuple[int, int]:
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in module.parameters() if not p.requires_grad)
        moving = sum(m.running_mean.numel() + m.running_var.numel() for m in module.modules()
                     if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None)
        return trainable, frozen + moving

    trainable, non_trainable = counts(network)
    children = [(name, type(child).__name__, sum(counts(child)),
                 sum(flops.get(f"{root}.{name}", {}).values()) // (2 * PROBE_BATCH))
                for name, child in network.named_children()]
    return ModuleCounts((num_classes,), trainable, non_trainable, sum(p.numel() for p in network.parameters()),
                        counter.get_total_flops() // (2 * PROBE_BATCH), children), root


# ---------------------------------------------------------------------------------- torchvision


def torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def cifar_stem_names() -> list[str]:
    """The archs whose stem `model.cifar_stem=true` replaces: torchvision's ResNet class
    (resnet*, resnext*, wide_resnet*), whose stem is conv1 (7x7, stride 2) and maxpool."""
    import torchvision

    return [n for n in torchvision_names()
            if torchvision.models.get_model_builder(n).__module__ == "torchvision.models.resnet"]


def hub_checkpoints() -> Path:
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def pretrained_weights(arch: str, name: str) -> tuple[Any, Path]:
    """The weights enum member `name` stands for (DEFAULT, IMAGENET1K_V1 or ResNet18_Weights.IMAGENET1K_V1)
    and its file in the local torch hub cache; one line when either is not there."""
    import torchvision

    enum = torchvision.models.get_model_weights(arch)
    member = name.split(".", 1)[1] if name.startswith(f"{enum.__name__}.") else name
    allowed = ["DEFAULT", *enum.__members__]
    if member not in allowed:
        raise ConfigError(f"model.weights={name!r} is not a weights name of {arch}; allowed: null, "
                          f"{', '.join(allowed)}")
    weights = enum[member]  # DEFAULT is an alias member of the enum
    path = hub_checkpoints() / Path(weights.url).name
    if not path.is_file():
        raise ConfigError(f"model.weights={name} ({enum.__name__}.{weights.name}) is not in the local torch hub "
                          f"cache: looked for {path}; cnnlab does not download, so fetch {weights.url} on a "
                          f"machine with network and copy it there (or set TORCH_HOME to a folder whose "
                          f"hub/checkpoints has it)")
    return weights, path


def _replace_head(network: Any, old_classes: int, num_classes: int, arch: str) -> None:
    """A pretrained classifier's last nn.Linear (old_classes outputs) becomes a fresh one with num_classes."""
    from torch import nn

    heads = [name for name, m in network.named_modules() if isinstance(m, nn.Linear) and m.out_features == old_classes]
    if not heads:
        raise ConfigError(f"model.arch={arch} has no final nn.Linear with {old_classes} outputs to replace for "
                          f"{num_classes} classes; use model.weights=null or data with {old_classes} classes")
    parent_name, _, leaf = heads[-1].rpartition(".")
    parent = network.get_submodule(parent_name) if parent_name else network
    old = getattr(parent, leaf)
    setattr(parent, leaf, nn.Linear(old.in_features, num_classes, bias=old.bias is not None))


def torchvision_model(cfg: Mapping[str, Any], input_shape: tuple[int, ...], num_classes: int) -> OpaqueModel:
    """model=torchvision: checked (arch, num_classes, cifar_stem, weights), then measured."""
    import torchvision
    from torch import nn

    arch = cfg["arch"]
    names = torchvision_names()
    if arch not in names:
        close = difflib.get_close_matches(arch, names, n=5, cutoff=0.5)
        raise ConfigError(f"model.arch={arch!r} is not a torchvision classification model"
                          f"{'; did you mean ' + ', '.join(close) + '?' if close else ''} "
                          f"(all {len(names)}: torchvision.models.list_models(module=torchvision.models))")
    if cfg["num_classes"] != num_classes:
        raise ConfigError(f"model.num_classes={cfg['num_classes']} but data.num_classes={num_classes}: the network "
                          f"must have one output per class of the data; leave model.num_classes out (it follows "
                          f"data.num_classes) or set data.num_classes")
    stem = cfg["cifar_stem"]
    if stem and arch not in cifar_stem_names():
        raise ConfigError(f"model.cifar_stem=true replaces the stem of torchvision's ResNet class only, not "
                          f"{arch}'s; archs that support it: {', '.join(cifar_stem_names())}")
    weights = pretrained_weights(arch, cfg["weights"]) if cfg["weights"] is not None else None

    def make(pretrained: bool) -> nn.Module:
        if weights is None:
            network = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
        else:
            import torch

            enum, path = weights
            classes = len(enum.meta["categories"])
            network = torchvision.models.get_model(arch, weights=None, num_classes=classes)
            if pretrained:  # the meta-device measure has no values to load
                network.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            if classes != num_classes:
                _replace_head(network, classes, num_classes, arch)
        if stem:  # He et al.'s CIFAR stem: 3x3 stride 1, no max pool (32x32 stays 32x32)
            network.conv1 = nn.Conv2d(input_shape[0], network.conv1.out_channels, 3, 1, 1, bias=False)
            network.maxpool = nn.Identity()
        return network

    description = " ".join([f"torchvision {arch}", *(["cifar_stem"] if stem else []),
                            *([f"weights={weights[0]}"] if weights else [])])
    counts, class_name = measure(make, input_shape, num_classes, f"model.arch={arch}")
    return OpaqueModel("torchvision", description, make, counts, None, class_name)


# ---------------------------------------------------------------------------------- registered


def registered_model(cfg: Mapping[str, Any], input_shape: tuple[int, ...], num_classes: int) -> OpaqueModel:
    """model=registered: the factory named model.name, called with model.args, measured."""
    from cnnlab.model.registry import factory_of, source_of

    name, args = cfg["name"], dict(cfg["args"] or {})
    factory = factory_of(name)

    def make(pretrained: bool) -> Any:
        return factory(num_classes, tuple(input_shape), **args)

    call = f"{name}({num_classes}, {tuple(input_shape)}{''.join(f', {k}={v!r}' for k, v in args.items())})"
    counts, class_name = measure(make, tuple(input_shape), num_classes, f"model.name={name}: {call}")
    return OpaqueModel("registered", f"registered {call}", make, counts, source_of(factory), class_name, factory)
