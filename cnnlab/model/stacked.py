"""S seeds of one sequential CNN trained as one stacked network, without vmap.

On a GPU a lone small network is launch-bound: every layer is a kernel too
small to fill the device. A stack of S copies of a sequential CNN is itself a
plain network whose kernels are S times larger (DESIGN.md, "Stacking seeds
without vmap"):

    conv(Cin -> Cout)   Conv2d(S*Cin, S*Cout, groups=S), the same TF 'same' padding as build()
    dwconv (groups=C)   Conv2d(S*C, S*C*M, groups=S*C): still one group per input channel
    sepconv             that depthwise conv, then the pointwise 1x1 with groups=S
    res                 its convs (and projection) with groups=S, BatchNorm over S*W, the
                        zero-pad shortcut padding each copy's channels after its own
    bn over C           BatchNorm over S*C: per-copy statistics, exactly
    gn:G over C         GroupNorm(S*G, S*C): groups are consecutive channels, so group
                        s*G + g is copy s's group g, with its own statistics, exactly
    ln over C           GroupNorm(S, S*C) (ln is GroupNorm(1, C) in build()), exactly
    pooling, relu ...   per channel: build()'s own modules, unchanged
    dropout             per copy: exact (each copy's mask from its own generator) or fast
    flatten, gap, gmp   keep each copy's features together: (B, S*C, H, W) -> (S, B, F)
    dense(F -> U)       torch.baddbmm on (S, B, F) with weight (S, F, U)

Two layouts flow through the network: maps are (B, S*C, H, W) (copy s owns
channels s*C .. s*C + C - 1) and flat features are (S, B, F). The input is
(S, B, C, H, W), copy s seeing its own batch; the output is logits (S, B,
classes), the softmax of a softmax-ended network left out as build(logits=True)
does.

Copy s starts as the lone network of seed s exactly: `lone_networks` seeds
torch's generator as train.py does (`L.seed_everything(seed)` then `build`) and
copies each network into its slot. `stacked_loss` sums each copy's mean
cross-entropy, so each copy gets its lone gradient, and element-wise optimizers
(Adam, AdamW, SGD with momentum or weight decay) then make its lone update.
Exactly in arithmetic; in floating point the grouped convolution and the
batched matmul sum in another order than the lone kernels, so values differ in
the last bits (float64: gradients ~1e-16 apart). Adam magnifies one case: a
conv bias followed by BatchNorm has a gradient that is zero in exact
arithmetic, i.e. pure rounding noise, which Adam scales by 1/eps (see
tests/test_stacked.py for the figures). Dropout masks are bitwise the lone
ones. Anything that mixes copies would break the equivalence: gradient
clipping by norm is done per copy (`clip_copy_gradients_`: each copy's norm
over its own slots), while a GradScaler's inf check or an LR scheduler on a
monitored metric acts on all copies at once.

On the CPU call `set_channels_last()` for S > 1: oneDNN's grouped convolution
is several times slower on contiguous NCHW maps.

State-dict keys are build()'s (conv0.weight, bn1.running_mean, dense6.weight,
...); every per-copy tensor is split along its first dimension into S equal
blocks (dense weights are stored (S, in, out), the lone layout transposed).
`lone_state_dict(s)` / `load_lone_state_dict(s, state)` convert one copy to
and from a lone network's state dict. BatchNorm's `num_batches_tracked` is one
counter shared by all copies (they step together).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cnnlab.errors import ConfigError
from cnnlab.model.build import (
    activation_module,
    build,
    conv_module,
    ends_in_softmax,
    fused_activation,
    module_name,
    norm_module,
    pool_module,
    residual_modules,
)
from cnnlab.model.dropout import bernoulli_noise
from cnnlab.model.plan import ModelPlan
from cnnlab.model.shapes import Analysis, LayerInfo, shortcut_kind
from cnnlab.model.spec import (
    Activation,
    BatchNorm,
    Conv,
    Dense,
    DepthwiseConv,
    Dropout,
    Flatten,
    GlobalAvgPool,
    GlobalMaxPool,
    GroupNorm,
    LayerNorm,
    Pool,
    Residual,
    SeparableConv,
    describe,
)

DROPOUT_MODES = ("exact", "fast")
# Layer kinds the stack supports: every kind of cnnlab.model.spec today.
STACKABLE = (Conv, DepthwiseConv, SeparableConv, Residual, Dense, Pool, BatchNorm, GroupNorm, LayerNorm,
             Activation, Dropout, Flatten, GlobalAvgPool, GlobalMaxPool)
# Optimizer state tensors per parameter tensor (sgd: its momentum buffer, absent when momentum=0).
OPTIMIZER_STATE = {"adam": 2, "adamw": 2, "sgd": 1, "none": 0}


def supports_stacking(model: Analysis | ModelPlan) -> tuple[bool, str]:
    """(True, what stacks) when every layer can be stacked, else (False, one line saying why): the first
    layer that cannot, or that the model is an opaque module (torchvision, registered), which has no
    stacked form; a launcher then trains its seeds one by one."""
    if isinstance(model, ModelPlan):
        if model.analysis is None:
            return False, (f"model {model.name} is a {model.kind} module ({model.description}), not written in "
                           f"cnnlab's layer language: only layer lists stack")
        model = model.analysis
    analysis = model
    for layer in analysis.layers:
        if not isinstance(layer.spec, STACKABLE):
            return False, f"layer {layer.index} ({describe(layer.spec)}) has no stacked form"
    kinds = sorted({type(layer.spec).__name__.lower() for layer in analysis.layers})
    return True, f"all {len(analysis.layers)} layers stack ({', '.join(kinds)})"


# ---------------------------------------------------------------------------------------------
# Generators: one per copy, holding the state the lone run's global generator would have.


class CopyGenerators:
    """One torch.Generator per copy and device for exact dropout.

    A lone run seeds torch (train.py: `L.seed_everything(seed)`), builds its
    network on the CPU, and then every dropout mask comes from torch's global
    generator of the training device:

    * CPU: the global CPU generator, in the state it has right after build()
      (`cpu_states[s]`, recorded by `lone_networks`);
    * CUDA: the global CUDA generator, which build() does not touch, so its
      state is `manual_seed(seed)` (seed, offset 0).

    The states travel with a checkpoint through `get_states` / `set_states`.
    """

    def __init__(self, seeds: Sequence[int], cpu_states: Sequence[torch.Tensor | None]):
        self.seeds = [int(s) for s in seeds]
        self.cpu_states = list(cpu_states)
        self._by_device: dict[torch.device, list[torch.Generator]] = {}

    @staticmethod
    def _key(device: torch.device | str) -> torch.device:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return device

    def generators(self, device: torch.device | str) -> list[torch.Generator]:
        key = self._key(device)
        if key not in self._by_device:
            gens = []
            for seed, state in zip(self.seeds, self.cpu_states):
                g = torch.Generator(device=key)
                if key.type == "cpu" and state is not None:
                    g.set_state(state)
                else:
                    g.manual_seed(seed)
                gens.append(g)
            self._by_device[key] = gens
        return self._by_device[key]

    def get_states(self, device: torch.device | str = "cpu") -> list[torch.Tensor]:
        return [g.get_state() for g in self.generators(device)]

    def set_states(self, states: Sequence[torch.Tensor], device: torch.device | str = "cpu") -> None:
        gens = self.generators(device)
        if len(states) != len(gens):
            raise ValueError(f"{len(states)} generator states for {len(gens)} copies")
        for g, state in zip(gens, states):
            g.set_state(state)


# ---------------------------------------------------------------------------------------------
# Stacked layers. S = copies, B = batch; maps (B, S*C, H, W), flat features (S, B, F).


class FlatBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d over the S*F features of flat (S, B, F) input; copy s owns features s*F .. s*F+F-1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, b, f = x.shape
        y = super().forward(x.transpose(0, 1).reshape(b, s * f))  # (B, S*F)
        return y.view(b, s, f).transpose(0, 1)  # (S, B, F)


class FlatGroupNorm(nn.GroupNorm):
    """GroupNorm(S*G, S*F) over flat (S, B, F) input: copy s's F features are groups s*G .. s*G+G-1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, b, f = x.shape
        y = super().forward(x.transpose(0, 1).reshape(b, s * f))  # (B, S*F)
        return y.view(b, s, f).transpose(0, 1)  # (S, B, F)


class StackedLinear(nn.Module):
    """S dense layers as one batched matmul: (S, B, in) -> (S, B, out).

    `weight` is (S, in, out): copy s's lone nn.Linear weight, transposed.
    """

    def __init__(self, stack: int, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.zeros(stack, in_features, out_features))  # (S, in, out)
        self.bias = nn.Parameter(torch.zeros(stack, out_features)) if bias else None  # (S, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return torch.bmm(x, self.weight)  # (S, B, out)
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight)  # (S, 1, out) + (S, B, in) @ (S, in, out)

    def extra_repr(self) -> str:
        return f"stack={self.weight.shape[0]}, in_features={self.in_features}, " \
               f"out_features={self.out_features}, bias={self.bias is not None}"


class StackedFlatten(nn.Module):
    """(B, S*C, H, W) -> (S, B, C*H*W): each copy's features stay together, in lone (C, H, W) order."""

    def __init__(self, stack: int):
        super().__init__()
        self.stack = stack

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], self.stack, -1).transpose(0, 1)  # (B, S, C*H*W) -> (S, B, C*H*W)


class StackedGlobalAvgPool(nn.Module):
    """(B, S*C, H, W) -> (S, B, C): the mean over each map, as build()'s GlobalAvgPool2d."""

    def __init__(self, stack: int):
        super().__init__()
        self.stack = stack

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.mean(dim=(2, 3))  # (B, S*C)
        return pooled.view(pooled.shape[0], self.stack, -1).transpose(0, 1)  # (S, B, C)


class StackedGlobalMaxPool(nn.Module):
    """(B, S*C, H, W) -> (S, B, C): the max over each map, as build()'s GlobalMaxPool2d."""

    def __init__(self, stack: int):
        super().__init__()
        self.stack = stack

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.amax(dim=(2, 3))  # (B, S*C)
        return pooled.view(pooled.shape[0], self.stack, -1).transpose(0, 1)  # (S, B, C)


class StackedSoftmax(nn.Module):
    """Softmax over each copy's channels (maps) or features (flat), like nn.Softmax(dim=1) on a lone copy."""

    def __init__(self, stack: int):
        super().__init__()
        self.stack = stack

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            b, sc, h, w = x.shape
            return x.view(b, self.stack, sc // self.stack, h, w).softmax(dim=2).view(b, sc, h, w)
        return x.softmax(dim=-1)  # (S, B, F)


def _cuda_dropout(x: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """F.dropout (CUDA's fused kernel) drawing from `generator`: the global CUDA generator is
    swapped for it during the call, since native_dropout takes no generator argument.

    Not yet compared with a lone run on a GPU (written without one); not CUDA-graph safe."""
    default = torch.cuda.default_generators[x.device.index if x.device.index is not None
                                            else torch.cuda.current_device()]
    saved = default.get_state()
    default.set_state(generator.get_state())
    try:
        return F.dropout(x, p, True)
    finally:
        generator.set_state(default.get_state())
        default.set_state(saved)


class StackedDropout(nn.Module):
    """Dropout with per-copy masks.

    exact: copy s's mask is the one its lone run draws. On the CPU, cnnlab's Dropout
        (cnnlab.model.dropout) multiplies by `bernoulli_noise`, torch's dropout noise for
        a contiguous tensor of x's shape from the global generator; here the same noise
        is drawn for copy s's lone shape from copy s's generator, so masks and outputs
        match bitwise, whatever the memory layout of either.
        On CUDA nn.Dropout uses the fused native_dropout kernel, which takes no
        generator: the global CUDA generator is swapped for copy s's around an
        F.dropout call on copy s's (contiguous) slice. S mask draws per layer.
    fast: one F.dropout over the whole stacked tensor from torch's global
        generator: the same distribution, one kernel, not the lone masks.
    """

    def __init__(self, p: float, stack: int, generators: CopyGenerators, mode: str = "exact"):
        super().__init__()
        if mode not in DROPOUT_MODES:
            raise ConfigError(f"dropout_mode must be one of {', '.join(DROPOUT_MODES)}, got {mode!r}")
        self.p, self.stack, self.mode = p, stack, mode
        self._generators = generators  # shared by the network's dropout layers; not a module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if self.mode == "fast":
            return F.dropout(x, self.p, True)
        gens = self._generators.generators(x.device)
        maps = x.dim() == 4
        parts = x.chunk(self.stack, dim=1) if maps else x.unbind(0)  # S x (B, C, H, W) or S x (B, F)
        join = (lambda ts: torch.cat(ts, dim=1)) if maps else (lambda ts: torch.stack(ts, dim=0))
        if x.device.type == "cuda":
            return join([_cuda_dropout(part.contiguous(), self.p, g) for part, g in zip(parts, gens)])
        noise = [bernoulli_noise(part, 1 - self.p, generator=g) for part, g in zip(parts, gens)]
        return x * join(noise)  # (B, S*C, H, W) or (S, B, F); element-wise, so bitwise the lone products

    def extra_repr(self) -> str:
        return f"p={self.p}, stack={self.stack}, mode={self.mode}"


# ---------------------------------------------------------------------------------------------
# The network.


def lone_networks(analysis: Analysis, seeds: Iterable[int], init: str = "keras", bn_momentum: float = 0.99,
                  bn_eps: float = 1e-3) -> tuple[list[nn.Sequential], list[torch.Tensor]]:
    """Each seed's lone network as train.py builds it, and the global CPU generator's state right after.

    train.py calls `L.seed_everything(seed)` (whose effect on torch's CPU generator is
    `manual_seed(seed)`) and then `build(..., logits=True)`; its dropout masks then come from
    the generator in the state returned here. torch's global CPU generator is left as it was.
    """
    networks, states = [], []
    with torch.random.fork_rng(devices=[]):  # restores the global CPU generator afterwards
        for seed in seeds:
            torch.default_generator.manual_seed(int(seed))  # the CPU part of torch.manual_seed
            networks.append(build(analysis, init, bn_momentum, bn_eps, logits=True))
            states.append(torch.get_rng_state())
    return networks, states


class StackedNetwork(nn.Module):
    """S copies of the network `analysis` describes, copy s starting as seed s's lone network.

    forward: (S, B, C, H, W) -> logits (S, B, classes); copy s sees only x[s].
    """

    def __init__(self, analysis: Analysis, seeds: Sequence[int], init: str = "keras",
                 bn_momentum: float = 0.99, bn_eps: float = 1e-3, dropout_mode: str = "exact",
                 channels_last: bool = False):
        super().__init__()
        networks, states = lone_networks(analysis, seeds, init, bn_momentum, bn_eps)
        self._setup(analysis, seeds, states, 1 - bn_momentum, bn_eps, dropout_mode)
        self.set_channels_last(channels_last)
        for s, network in enumerate(networks):
            self.load_lone_state_dict(s, network.state_dict())

    @classmethod
    def from_lone(cls, analysis: Analysis, networks: Sequence[nn.Module], seeds: Sequence[int] | None = None,
                  rng_states: Sequence[torch.Tensor] | None = None, dropout_mode: str = "exact"
                  ) -> StackedNetwork:
        """Stack lone build() networks (their BatchNorm momentum and eps, dtype and device are kept).

        For exact dropout give `rng_states`, the CPU generator state each lone run would
        draw its masks from (`lone_networks` returns them), and `seeds` for CUDA; without
        them copy s draws from a generator seeded with seeds[s] (default s).
        """
        seeds = list(range(len(networks))) if seeds is None else list(seeds)
        if len(seeds) != len(networks) or (rng_states is not None and len(rng_states) != len(networks)):
            raise ValueError(f"{len(networks)} networks, {len(seeds)} seeds, "
                             f"{len(rng_states) if rng_states is not None else 'no'} generator states")
        bns = [m for m in networks[0].modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        momentum, eps = (bns[0].momentum, bns[0].eps) if bns else (0.01, 1e-3)
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(analysis, seeds, rng_states or [None] * len(networks), momentum, eps, dropout_mode)
        first = next(networks[0].parameters(), None)
        if first is not None:  # the lone networks' dtype and device, so loading rounds nothing
            self.to(device=first.device, dtype=first.dtype)
        for s, network in enumerate(networks):
            self.load_lone_state_dict(s, network.state_dict())
        return self

    def _setup(self, analysis: Analysis, seeds: Sequence[int], cpu_states: Sequence[torch.Tensor | None],
               torch_momentum: float, eps: float, dropout_mode: str) -> None:
        ok, reason = supports_stacking(analysis)
        if not ok:
            raise ConfigError(f"cannot stack this network: {reason}")
        if dropout_mode not in DROPOUT_MODES:
            raise ConfigError(f"dropout_mode must be one of {', '.join(DROPOUT_MODES)}, got {dropout_mode!r}")
        if len(seeds) < 1:
            raise ConfigError("a stack needs at least one seed")
        self.analysis = analysis
        self.channels_last = False
        self.stack = len(seeds)
        self.seeds = [int(s) for s in seeds]
        self.dropout_mode = dropout_mode
        self.generators = CopyGenerators(self.seeds, cpu_states)
        self._leading: set[str] = set()  # keys of StackedLinear tensors: slot s is t[s]
        modules = [pair for layer in analysis.layers
                   for pair in self._layer_modules(layer, torch_momentum, eps)]
        if ends_in_softmax(analysis):
            modules = modules[:-1]  # logits, as build(logits=True)
        for name, module in modules:
            self.add_module(name, module)

    def _layer_modules(self, layer: LayerInfo, momentum: float, eps: float) -> Iterator[tuple[str, nn.Module]]:
        """(name, module) pairs with build()'s names (`_layer_modules` there)."""
        spec, s, name = layer.spec, self.stack, module_name(layer)
        match spec:
            case Conv() | DepthwiseConv() | SeparableConv():
                yield name, conv_module(layer, spec, stack=s)  # grouped by copy (and by channel)
            case Residual():
                yield name, residual_modules(layer, spec, s, lambda c: nn.BatchNorm2d(c, eps=eps, momentum=momentum),
                                             lambda: self.activation_module(spec.activation))
            case Dense():
                self._leading |= {f"{name}.weight", f"{name}.bias"}
                yield name, StackedLinear(s, layer.input_shape[0], spec.units, spec.bias)
            case Pool():
                yield name, pool_module(layer, spec)  # per channel: as built
            case BatchNorm():
                cls = nn.BatchNorm2d if len(layer.input_shape) == 3 else FlatBatchNorm
                yield name, cls(s * layer.input_shape[0], eps=eps, momentum=momentum)
            case GroupNorm() | LayerNorm():
                norm = norm_module(layer, stack=s)  # GroupNorm(S*G, S*C)
                if len(layer.input_shape) == 1:
                    norm = FlatGroupNorm(norm.num_groups, norm.num_channels, eps=norm.eps)
                yield name, norm
            case Activation():
                yield name, self.activation_module(spec.name)
            case Dropout():
                yield name, StackedDropout(spec.rate, s, self.generators, self.dropout_mode)
            case Flatten():
                yield name, StackedFlatten(s)
            case GlobalAvgPool():
                yield name, StackedGlobalAvgPool(s)
            case GlobalMaxPool():
                yield name, StackedGlobalMaxPool(s)
        if fused_activation(spec):
            yield f"{name}_{spec.activation}", self.activation_module(spec.activation)

    def activation_module(self, name: str) -> nn.Module:
        return StackedSoftmax(self.stack) if name == "softmax" else activation_module(name)  # others: element-wise

    def set_channels_last(self, enabled: bool = True) -> StackedNetwork:
        """Maps in channels-last memory (conv weights too). On the CPU oneDNN's grouped
        convolution is several times slower on contiguous NCHW maps than on channels-last
        ones (benchmarks/stacked_step.py); the values are the same either way."""
        self.channels_last = bool(enabled)
        return self.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, b, c, h, w = x.shape  # (S, B, C, H, W)
        if s != self.stack:
            raise ValueError(f"input has {s} copies, the stack {self.stack}")
        if self.channels_last:  # (B, H, W, S*C) in memory, one copy
            x = x.permute(1, 3, 4, 0, 2).reshape(b, h, w, s * c).permute(0, 3, 1, 2)  # (B, S*C, H, W)
        else:
            x = x.transpose(0, 1).reshape(b, s * c, h, w)  # (B, S*C, H, W)
        for module in self.children():
            x = module(x)
        return x  # (S, B, classes) logits

    # -- per-copy state ------------------------------------------------------------------

    def _slot(self, key: str, tensor: torch.Tensor, s: int) -> torch.Tensor:
        """Copy s's part of a state tensor, as a view in the lone layout."""
        if tensor.dim() == 0:
            return tensor  # num_batches_tracked: one counter for all copies
        if key in self._leading:
            return tensor[s].T if key.endswith(".weight") else tensor[s]  # (in, out) -> lone (out, in)
        return tensor.unflatten(0, (self.stack, -1))[s]  # (S*C, ...) -> (C, ...)

    def slot(self, key: str, tensor: torch.Tensor, s: int) -> torch.Tensor:
        """Copy s's part of `tensor`, shaped as the state tensor `key` (a parameter, a buffer, or
        optimizer state shaped like a parameter), as a view in the lone layout."""
        return self._slot(key, tensor, s)

    def lone_state_dict(self, s: int) -> OrderedDict[str, torch.Tensor]:
        """Copy s's state dict in build()'s keys and layout (loads with strict=True)."""
        return OrderedDict((key, self._slot(key, t, s).clone(memory_format=torch.contiguous_format))
                           for key, t in self.state_dict().items())

    @torch.no_grad()
    def load_lone_state_dict(self, s: int, state: Mapping[str, torch.Tensor]) -> None:
        """Load a lone network's state dict into copy s (every key, no other: strict)."""
        own = self.state_dict()  # detached tensors sharing storage with the parameters and buffers
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise KeyError(f"copy {s}: missing keys {missing}, unexpected keys {unexpected}")
        for key, tensor in own.items():
            target = self._slot(key, tensor, s)
            if tuple(state[key].shape) != tuple(target.shape):
                raise ValueError(f"copy {s}: {key} has shape {tuple(state[key].shape)}, "
                                 f"the lone layout is {tuple(target.shape)}")
            target.copy_(state[key])

    def per_copy_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Parameters and persistent buffers split into S blocks along dim 0 (not num_batches_tracked)."""
        for key, tensor in self.state_dict(keep_vars=True).items():
            if tensor.dim() > 0:
                yield key, tensor


# ---------------------------------------------------------------------------------------------
# Loss, masking of diverged copies.


def stacked_loss(logits: torch.Tensor, y: torch.Tensor, alive: torch.Tensor | None = None,
                 label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(total, per_copy): the sum over copies of each copy's mean cross-entropy, and each copy's loss.

    logits (S, B, classes), y (S, B). d total / d logits[s] is exactly the gradient of
    copy s's lone loss F.cross_entropy(logits[s], y[s]). `per_copy` (S,) is detached, for logging.

    `alive` (S,) bool, if given, is updated in place: a copy whose loss is not finite is
    masked from this step on, and masked copies are left out of `total` (torch.where, so a
    NaN never enters it). Their parameters can still get NaN gradients from NaN activations:
    `CopyGuard` zeroes those and freezes the copies.
    """
    s, b, k = logits.shape
    losses = F.cross_entropy(logits.reshape(s * b, k), y.reshape(s * b), reduction="none",
                             label_smoothing=label_smoothing)  # (S*B,)
    per_copy = losses.view(s, b).mean(dim=1)  # (S,)
    if alive is None:
        return per_copy.sum(), per_copy.detach()
    alive &= torch.isfinite(per_copy.detach())
    return torch.where(alive, per_copy, torch.zeros_like(per_copy)).sum(), per_copy.detach()


class CopyGuard:
    """Masks copies whose loss became non-finite and freezes them; live copies are untouched.

    Zero gradients alone do not freeze a copy: Adam's momentum, SGD's momentum buffer and
    weight decay keep moving its weights, and its BatchNorm statistics took the NaN batch
    already. So a masked copy's slots of the parameters, BatchNorm running statistics and
    optimizer state tensors shaped like their parameter (exp_avg, exp_avg_sq,
    momentum_buffer ...) are put back after every optimizer step to their values before the
    step whose loss was not finite: the copy stays where a lone run stopped at that step
    would be. Shared scalars (Adam's step count, num_batches_tracked) keep counting. Live
    copies' slots are never written, so their training is bitwise what it is without the
    guard and without the masked copy (tests/test_stacked.py checks both).

    One training step:

        logits = network(x)
        loss, per_copy = stacked_loss(logits, y, guard.alive)  # updates guard.alive
        loss.backward()
        guard.mask_gradients()      # masked copies' (NaN) gradients -> 0
        optimizer.step()
        guard.commit()              # masked copies back to their frozen state

    Two ways to know the masked copies:

    sync=True (default on the CPU, where a host sync costs nothing): mask_gradients reads
        `alive` on the host once a step. Until a copy dies the guard only copies the
        BatchNorm statistics (a few floats) each step; when one dies it saves that copy's
        slots (parameters and optimizer state are still those before the step; the
        statistics come from the copy made after the previous step), and from then on it
        rewrites only that copy's slots.
    sync=False (default on CUDA, where a sync per step stalls the launch queue): no host
        sync. The guard keeps the last good value of every tracked tensor and after each
        step selects, with torch.where, the new value for live copies and the kept one for
        masked copies: one copy of the state in memory and a few element-wise kernels per
        tensor per step.

    Make the guard after the network is on its device and, on resume, load its state after
    the network's and the optimizer's (the masked copies' slots already hold their frozen
    state then).
    """

    def __init__(self, network: StackedNetwork, optimizer: torch.optim.Optimizer | None = None,
                 sync: bool | None = None):
        self.network, self.optimizer = network, optimizer
        self.stack = network.stack
        device = next(network.parameters()).device
        self.sync = device.type != "cuda" if sync is None else bool(sync)
        self.alive = torch.ones(network.stack, dtype=torch.bool, device=device)
        self._good: dict[tuple, torch.Tensor] = {}  # by _tracked's keys; sync: BatchNorm statistics only
        self._frozen: dict[int, dict[tuple, torch.Tensor]] = {}  # sync: masked copy -> its saved slots
        self._remember()

    def _tracked(self) -> Iterator[tuple[tuple, torch.Tensor]]:
        parameters = {name for name, _ in self.network.named_parameters()}
        for name, tensor in self.network.per_copy_tensors():
            yield ("parameter" if name in parameters else "buffer", name), tensor
        if self.optimizer is not None:
            for index, p in enumerate(self.network.parameters()):
                for name, value in self.optimizer.state.get(p, {}).items():
                    if torch.is_tensor(value) and value.shape == p.shape:
                        yield ("optimizer", index, name), value

    def _blocks(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.unflatten(0, (self.stack, -1))  # (S, ...): block s is copy s's slot

    @torch.no_grad()
    def _remember(self) -> None:
        """The current state as the last good one (a masked copy's slots hold its frozen state)."""
        self._good = {key: tensor.detach().clone() for key, tensor in self._tracked()
                      if not self.sync or key[0] == "buffer"}
        if self.sync:
            dead = (~self.alive).nonzero().flatten().tolist()
            self._frozen = {s: {key: self._blocks(t)[s].clone() for key, t in self._tracked()} for s in dead}

    @torch.no_grad()
    def mask_gradients(self) -> None:
        """After backward: masked copies' gradients to zero (live copies' untouched)."""
        if not self.sync:
            for p in self.network.parameters():
                if p.grad is not None:
                    keep = self.alive.view(self.stack, *([1] * p.dim()))  # (S, 1, ...)
                    p.grad.copy_(torch.where(keep, self._blocks(p.grad), 0.0).view_as(p.grad))
            return
        dead = (~self.alive).nonzero().flatten().tolist()  # the host sync
        for s in dead:
            if s not in self._frozen:  # masked in this step: parameters and optimizer state are still
                # the step's inputs; its BatchNorm statistics took this step's batch, so from _good
                self._frozen[s] = {key: self._blocks(self._good[key] if key[0] == "buffer" else t)[s].clone()
                                   for key, t in self._tracked()}
        if dead:
            for p in self.network.parameters():
                if p.grad is not None:
                    self._blocks(p.grad)[dead] = 0

    @torch.no_grad()
    def commit(self) -> None:
        """After optimizer.step(): masked copies' slots back to their frozen values."""
        for key, tensor in self._tracked():
            if self.sync:
                for s, saved in self._frozen.items():
                    slot = self._blocks(tensor)[s]
                    # optimizer state that did not exist yet when the copy died: none (zeros)
                    slot.copy_(saved[key]) if key in saved else slot.zero_()
                if key[0] == "buffer":
                    self._good[key].copy_(tensor)
                continue
            good = self._good.get(key)
            if good is None:  # optimizer state made by this step: a copy masked already has none
                good = self._good[key] = torch.zeros_like(tensor)
            keep = self.alive.view(self.stack, *([1] * tensor.dim()))
            torch.where(keep, self._blocks(tensor), self._blocks(good), out=self._blocks(good))
            tensor.copy_(good)

    def state_dict(self) -> dict:
        return {"alive": self.alive.clone()}

    def load_state_dict(self, state: Mapping) -> None:
        self.alive.copy_(state["alive"])
        self._remember()


# ---------------------------------------------------------------------------------------------
# Gradient clipping, per copy.


@torch.no_grad()
def clip_grad_norm_per_copy_(network: StackedNetwork, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_(copy s's parameters, max_norm) for every copy s at once; returns
    each copy's total gradient 2-norm before clipping, (S,).

    As clip_grad_norm_ computes it for a lone network: each gradient tensor's norm (here one per
    copy, over the copy's slot), the norm of those norms, and every gradient of the copy times
    clamp(max_norm / (norm + 1e-6), max=1). No copy's slots enter another's norm, so a copy with
    non-finite gradients gets a NaN factor of its own and leaves the others' unchanged. One norm
    kernel per parameter tensor for all copies, no loop over copies and no host sync.
    """
    s = network.stack
    grads = [p.grad for p in network.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(s)
    # Every parameter is split along dim 0 into S blocks (StackedLinear's (S, in, out) too): block s is copy s's.
    norms = torch.stack([torch.linalg.vector_norm(g.unflatten(0, (s, -1)), dim=tuple(range(1, g.dim() + 1)))
                         for g in grads])  # (P, S)
    total = torch.linalg.vector_norm(norms, dim=0)  # (S,)
    factor = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # torch's eps and clamp
    for g in grads:
        g.unflatten(0, (s, -1)).mul_(factor.view(s, *([1] * g.dim())))  # (S, 1, ...): a view, in place
    return total


def clip_copy_gradients_(network: StackedNetwork, clip_val: float | None, algorithm: str = "norm") -> None:
    """What Lightning's gradient clipping does to a lone run (Precision.clip_gradients), for each copy:
    nothing for clip_val None or <= 0; "value": every gradient element clamped to +-clip_val (element-wise,
    so the stacked tensors at once); "norm": each copy's gradients scaled by its own norm
    (`clip_grad_norm_per_copy_`). Call it after backward (and CopyGuard.mask_gradients), before the step."""
    if clip_val is None or clip_val <= 0:
        return
    if algorithm == "value":
        torch.nn.utils.clip_grad_value_(network.parameters(), clip_val)
    elif algorithm == "norm":
        clip_grad_norm_per_copy_(network, clip_val)
    else:
        raise ConfigError(f"gradient clipping algorithm must be norm or value, got {algorithm!r}")


# ---------------------------------------------------------------------------------------------
# Memory.


def _activation_elements(analysis: Analysis) -> int:
    """Elements of one sample's input and every module's output (a fused activation is its own
    module; a residual block's and a separable conv's inner tensors count too)."""
    total = math.prod(analysis.input_shape)
    for layer in analysis.layers:
        spec, size = layer.spec, math.prod(layer.output_shape)
        outputs = 2 if fused_activation(spec) else 1
        if isinstance(spec, SeparableConv):  # the depthwise output
            total += layer.input_shape[0] * spec.multiplier * math.prod(layer.output_shape[1:])
        if isinstance(spec, Residual):
            # conv1, act1, conv2, sum, act2; a BN after each conv; the shortcut's conv and BN or pad
            kind = shortcut_kind(spec, layer.input_shape[0])
            shortcut = {"projection": 2 if spec.bn else 1, "zero-pad": 1, "identity": 0}[kind]
            outputs = 5 + (2 if spec.bn else 0) + shortcut
        total += outputs * size
    return total


def stacked_memory_bytes(analysis: Analysis, batch: int, stack: int, optimizer: str = "adam",
                         dtype_bytes: int = 4) -> int:
    """An estimate of a training step's memory for `stack` copies at `batch` images each.

    parameters + gradients + optimizer state (adam/adamw: 2 tensors per parameter, sgd: 1,
    its momentum buffer; "none": 0) + BatchNorm running statistics + activations: the input
    and every layer's output x batch x stack, x 2 for what backward keeps (saved inputs,
    masks, gradients in flight). Not counted: the framework's workspace (cuDNN, allocator
    rounding and caching), the CUDA context, the dataset, CopyGuard's copy of the state.
    Use it to choose a stack size with a margin, not as a bound.
    """
    if optimizer not in OPTIMIZER_STATE:
        raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZER_STATE)}, got {optimizer!r}")
    params = analysis.trainable * stack
    state = params * (2 + OPTIMIZER_STATE[optimizer]) + analysis.non_trainable * stack
    activations = _activation_elements(analysis) * batch * stack * 2
    return (state + activations) * dtype_bytes
