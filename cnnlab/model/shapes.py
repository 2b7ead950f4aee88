"""Shapes, receptive field, parameters and MACs of a layer list, from the specs alone.

Everything here follows Keras (TensorFlow) semantics, as the chapter does:

* output size, `valid`: ceil((n - k + 1) / s); `same`: ceil(n / s)
* `same` padding total = max((out - 1) * s + k - n, 0), split
  before = total // 2, after = total - before (the extra pixel goes bottom/right)
* parameters counted as Keras counts them: BatchNorm's gamma and beta are
  trainable, its moving mean and variance are non-trainable; GroupNorm and
  LayerNorm have gamma and beta per channel (2C, trainable) and no moving
  statistics; DepthwiseConv2D k*k*C*M (+ C*M bias); SeparableConv2D
  k*k*C*M + C*M*F (+ F bias)
* MACs are the multiply-accumulates of convolutions (depthwise, pointwise, a
  residual block's two convs and its projection shortcut included) and dense
  layers: for a conv, out_h * out_w * out_channels * k_h * k_w * in_channels /
  groups. Not counted: bias adds, normalisation, activations, pooling, the
  residual addition and zero padding. That is what
  `torch.utils.flop_counter.FlopCounterMode` counts (convolution, mm, addmm,
  bmm), with FLOPs = 2 x MACs
* receptive field per axis: size r, jump j (input pixels between adjacent
  outputs) and start (centre of the first output's field, in input pixel
  coordinates where pixel 0 spans [0, 1)); r' = r + (k - 1) j, j' = j s,
  start' = start + ((k - 1) / 2 - pad_before) j. A residual block's field is
  its main path's (two 3x3 convs): the shortcut's 1x1 window lies inside the
  first conv's. Like the usual definition (Araujo et al. 2019, "Computing
  receptive fields of convolutional neural networks") it follows the sliding
  windows only: normalisation statistics (BatchNorm in training, GroupNorm and
  LayerNorm always) are taken over the whole map and count as per-pixel here.

A stack that cannot run fails here, before any torch import or MLflow run,
with one error naming the layer's index, the layer and the sizes.

Shapes are (C, H, W) for maps and (F,) once flattened.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from cnnlab.errors import ConfigError
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
    LayerSpec,
    Pair,
    Pool,
    Residual,
    SeparableConv,
    describe,
    to_token,
)

Shape = tuple[int, ...]


def output_size(n: int, k: int, s: int, padding: str) -> int:
    """Keras's output length along one axis (0 when `valid` does not fit)."""
    if padding == "same":
        return math.ceil(n / s)
    return max(math.ceil((n - k + 1) / s), 0)


def same_padding(n: int, k: int, s: int) -> tuple[int, int]:
    """TensorFlow's (before, after) padding for `same`: the extra pixel goes after."""
    total = max((math.ceil(n / s) - 1) * s + k - n, 0)
    return total // 2, total - total // 2


@dataclass(frozen=True)
class ReceptiveField:
    size: Pair
    jump: Pair
    start: tuple[float, float]


@dataclass(frozen=True)
class LayerInfo:
    index: int
    spec: LayerSpec
    input_shape: Shape
    output_shape: Shape
    padding: tuple[int, int, int, int]  # (top, bottom, left, right); zeros when none
    trainable: int
    non_trainable: int
    macs: int
    rf: ReceptiveField | None  # None once the spatial layout is gone (flatten, gap, dense)

    @property
    def params(self) -> int:
        return self.trainable + self.non_trainable


@dataclass(frozen=True)
class Analysis:
    input_shape: Shape
    layers: list[LayerInfo] = field(default_factory=list)

    @property
    def output_shape(self) -> Shape:
        return self.layers[-1].output_shape

    @property
    def trainable(self) -> int:
        return sum(layer.trainable for layer in self.layers)

    @property
    def non_trainable(self) -> int:
        return sum(layer.non_trainable for layer in self.layers)

    @property
    def total_params(self) -> int:
        return self.trainable + self.non_trainable

    @property
    def macs(self) -> int:
        return sum(layer.macs for layer in self.layers)

    @property
    def receptive_field(self) -> ReceptiveField:
        """The field of the last layer that still has a spatial layout."""
        spatial = [layer.rf for layer in self.layers if layer.rf is not None]
        return spatial[-1] if spatial else ReceptiveField((1, 1), (1, 1), (0.5, 0.5))

    def as_dict(self) -> dict:
        """Plain data for JSON and tests; shapes are listed (C, H, W)."""
        rf = self.receptive_field
        return {
            "input_shape": list(self.input_shape),
            "output_shape": list(self.output_shape),
            "layers": [
                {
                    "index": layer.index,
                    "token": to_token(layer.spec),
                    "layer": layer_text(layer),
                    "input_shape": list(layer.input_shape),
                    "output_shape": list(layer.output_shape),
                    "padding": list(layer.padding),
                    "trainable": layer.trainable,
                    "non_trainable": layer.non_trainable,
                    "params": layer.params,
                    "macs": layer.macs,
                    "receptive_field": None if layer.rf is None else {
                        "size": list(layer.rf.size), "jump": list(layer.rf.jump),
                        "start": list(layer.rf.start)},
                }
                for layer in self.layers
            ],
            "total_params": self.total_params,
            "trainable_params": self.trainable,
            "non_trainable_params": self.non_trainable,
            # PyTorch keeps BN's moving statistics as buffers, not parameters,
            # so its parameter count equals Keras's "trainable" figure.
            "torch_parameters": self.trainable,
            "macs": self.macs,
            "flops": 2 * self.macs,
            "receptive_field": {"size": list(rf.size), "jump": list(rf.jump),
                                "start": list(rf.start)},
        }


def format_shape(shape: Shape) -> str:
    """Keras-style display, channels last: (6, 16, 16) -> '16x16x6'."""
    if len(shape) == 3:
        c, h, w = shape
        return f"{h}x{w}x{c}"
    return "x".join(str(d) for d in shape)


def _fail(index: int, spec: LayerSpec, message: str) -> ConfigError:
    return ConfigError(f"layer {index} ({describe(spec)}) {message}")


def _need_map(index: int, spec: LayerSpec, shape: Shape) -> None:
    if len(shape) != 3:
        raise _fail(index, spec, f"needs a CxHxW map, got a flat input of {shape[0]} features")


def _grow(rf: ReceptiveField, kernel: Pair, stride: Pair, pads: list[tuple[int, int]]) -> ReceptiveField:
    """The field after one sliding window (kernel, stride, (before, after) padding per axis)."""
    return ReceptiveField(
        size=tuple(r + (k - 1) * j for r, k, j in zip(rf.size, kernel, rf.jump)),
        jump=tuple(j * s for j, s in zip(rf.jump, stride)),
        start=tuple(st + ((k - 1) / 2 - p[0]) * j for st, k, p, j in zip(rf.start, kernel, pads, rf.jump)),
    )


def _window(index: int, spec: LayerSpec, shape: Shape, rf: ReceptiveField | None,
            kernel: Pair, stride: Pair, padding: str):
    """Output (H, W), padding and receptive field of a sliding-window layer."""
    _need_map(index, spec, shape)
    _, h, w = shape
    if padding == "valid" and (h < kernel[0] or w < kernel[1]):
        raise _fail(index, spec,
                    f"needs at least {kernel[0]}x{kernel[1]} input, got {h}x{w}")
    out = tuple(output_size(n, k, s, padding) for n, k, s in zip((h, w), kernel, stride))
    pads = [same_padding(n, k, s) if padding == "same" else (0, 0)
            for n, k, s in zip((h, w), kernel, stride)]
    return out, (pads[0][0], pads[0][1], pads[1][0], pads[1][1]), _grow(rf, kernel, stride, pads)


def shortcut_kind(spec: Residual, in_channels: int) -> str:
    """A residual block's shortcut: "identity", "projection" or "zero-pad" (He et al. 2016's B and A).

    By default identity when the block keeps the shape, else the projection; `proj` asks for the
    projection always (option C where the shape is kept); `pad` for option A.
    """
    keeps_shape = spec.stride == (1, 1) and spec.filters == in_channels
    if spec.shortcut == "proj" or (spec.shortcut == "auto" and not keeps_shape):
        return "projection"
    return "identity" if keeps_shape else "zero-pad"


def layer_text(layer: LayerInfo) -> str:
    """describe() plus what the input decides: a residual block's shortcut."""
    if isinstance(layer.spec, Residual) and layer.spec.shortcut == "auto":
        return f"{describe(layer.spec)}, {shortcut_kind(layer.spec, layer.input_shape[0])}"
    return describe(layer.spec)


def _residual(index: int, spec: Residual, shape: Shape, rf: ReceptiveField | None):
    """Output shape, first conv's padding, field, (trainable, non-trainable) and MACs of a basic block.

    Main path conv 3x3 stride s `same` -> BN -> act -> conv 3x3 `same` -> BN; convs carry a
    bias only without BN (BN's beta makes it redundant, as in He et al. 2016 and torchvision).
    """
    (oh, ow), pads, rf1 = _window(index, spec, shape, rf, (3, 3), spec.stride, "same")
    rf = _grow(rf1, (3, 3), (1, 1), [(1, 1), (1, 1)])  # 3x3 stride 1 same: one pixel each side
    cin, width = shape[0], spec.filters
    kind = shortcut_kind(spec, cin)
    if kind == "zero-pad" and width < cin:
        raise _fail(index, spec, f"cannot zero-pad {cin} input channels to {width}; use proj "
                    "(or a width >= the input's channels)")
    bias = 0 if spec.bn else width
    trainable = 9 * cin * width + bias + 9 * width * width + bias
    macs = oh * ow * width * 9 * (cin + width)
    norms = 2
    if kind == "projection":
        trainable += cin * width + bias
        macs += oh * ow * width * cin
        norms += 1
    if not spec.bn:
        norms = 0
    return (width, oh, ow), pads, rf, (trainable + 2 * width * norms, 2 * width * norms), macs


def analyse(specs: list[LayerSpec], input_shape: Shape) -> Analysis:
    """Walk the layer list, tracking shape and receptive field; fail on the first impossible layer."""
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise ConfigError(f"input shape must be (channels, height, width) with positive sizes, "
                          f"got {tuple(input_shape)}")
    shape: Shape = tuple(int(d) for d in input_shape)
    rf: ReceptiveField | None = ReceptiveField((1, 1), (1, 1), (0.5, 0.5))
    layers: list[LayerInfo] = []
    for index, spec in enumerate(specs):
        pads = (0, 0, 0, 0)
        trainable = non_trainable = macs = 0
        match spec:
            case Conv():
                (oh, ow), pads, rf = _window(index, spec, shape, rf, spec.kernel, spec.stride, spec.padding)
                cin = shape[0]
                kh, kw = spec.kernel
                trainable = kh * kw * cin * spec.filters + (spec.filters if spec.bias else 0)
                macs = oh * ow * spec.filters * kh * kw * cin
                out: Shape = (spec.filters, oh, ow)
            case DepthwiseConv():  # Keras DepthwiseConv2D: groups = C, C*M outputs
                (oh, ow), pads, rf = _window(index, spec, shape, rf, spec.kernel, spec.stride, spec.padding)
                depth = shape[0] * spec.multiplier
                kh, kw = spec.kernel
                trainable = kh * kw * depth + (depth if spec.bias else 0)
                macs = oh * ow * depth * kh * kw
                out = (depth, oh, ow)
            case SeparableConv():  # Keras SeparableConv2D: depthwise (no bias), then pointwise 1x1
                (oh, ow), pads, rf = _window(index, spec, shape, rf, spec.kernel, spec.stride, spec.padding)
                depth = shape[0] * spec.multiplier
                kh, kw = spec.kernel
                trainable = kh * kw * depth + depth * spec.filters + (spec.filters if spec.bias else 0)
                macs = oh * ow * depth * (kh * kw + spec.filters)
                out = (spec.filters, oh, ow)
            case Residual():
                out, pads, rf, (trainable, non_trainable), macs = _residual(index, spec, shape, rf)
            case Pool():
                (oh, ow), pads, rf = _window(index, spec, shape, rf, spec.size, spec.stride, spec.padding)
                out = (shape[0], oh, ow)
            case Dense():
                if len(shape) != 1:
                    raise _fail(index, spec, f"needs a flat input, got a {format_shape(shape)} "
                                "map; add 'flatten' or 'gap' before it")
                trainable = shape[0] * spec.units + (spec.units if spec.bias else 0)
                macs = shape[0] * spec.units
                out, rf = (spec.units,), None
            case BatchNorm():
                channels = shape[0]
                trainable, non_trainable = 2 * channels, 2 * channels
                out = shape
            case GroupNorm() | LayerNorm():
                groups = spec.groups if isinstance(spec, GroupNorm) else 1
                if shape[0] % groups:
                    raise _fail(index, spec, f"needs channels divisible by its {groups} groups, "
                                f"got {shape[0]} channels")
                if math.prod(shape) // groups < 2:  # torch refuses; Keras would output beta alone
                    raise _fail(index, spec, f"would normalise groups of a single value (input "
                                f"{format_shape(shape)}, {groups} group{'s' * (groups > 1)}); "
                                "a group needs at least 2")
                trainable, out = 2 * shape[0], shape
            case Flatten():
                _need_map(index, spec, shape)
                out, rf = (math.prod(shape),), None
            case GlobalAvgPool() | GlobalMaxPool():
                _need_map(index, spec, shape)
                out, rf = (shape[0],), None
            case Activation() | Dropout():
                out = shape
            case _:
                raise TypeError(f"not a layer spec: {spec!r}")
        if min(out) < 1:
            raise _fail(index, spec, f"would produce an empty output {format_shape(out)} "
                        f"from input {format_shape(shape)}")
        layers.append(LayerInfo(index, spec, shape, out, pads, trainable, non_trainable, macs, rf))
        shape = out
    return Analysis(tuple(int(d) for d in input_shape), layers)


def check_classifier(analysis: Analysis, num_classes: int) -> None:
    """The network must end in one score per class."""
    if analysis.output_shape != (num_classes,):
        raise ConfigError(
            f"the network ends in {format_shape(analysis.output_shape)} but the data has "
            f"{num_classes} classes; end the layer list with flatten (or gap) and "
            f"dense:{num_classes}")
