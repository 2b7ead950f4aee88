"""The layer language: one-line tokens -> typed layer specs.

A network is a list of tokens, the same in YAML and on the command line:

    [conv:6:5:same, bn, relu, maxpool:2:same, dropout:0.2, flatten,
     dense:128:relu, dropout:0.2, dense:10:softmax]

Grammar (fields separated by ':'; defaults are Keras's):

    conv:FILTERS:KERNEL[:OPTION...]   KERNEL is 5 or 5x3 (height x width)
        options: sN or sNxM (stride, default 1), same | valid (default valid),
                 an activation name (default none), nobias
    dense:UNITS[:OPTION...]           options: an activation name, nobias
    maxpool:SIZE[:OPTION...]          SIZE is 2 or 2x3; options: sN or sNxM
    avgpool:SIZE[:OPTION...]            (stride, default SIZE), same | valid (default valid)
    dwconv:KERNEL[:OPTION...]         Keras DepthwiseConv2D: one KERNEL filter per input channel
        options: sN or sNxM, same | valid (default valid), mM (depth multiplier, default 1:
                 C -> C*M channels), an activation name, nobias
    sepconv:FILTERS:KERNEL[:OPTION...]  Keras SeparableConv2D: the depthwise conv above (stride,
        padding, multiplier; no bias), then a 1x1 conv to FILTERS (bias, activation); same options
    res:WIDTH[:OPTION...]             residual basic block (He et al. 2016): conv 3x3 (stride s,
        same) - BN - ACT - conv 3x3 (same) - BN, plus the shortcut, then ACT
        options: sN or sNxM (stride of the first conv and of the shortcut, default 1),
                 proj | pad (shortcut, default: identity when the shape is kept, else proj),
                 nobn (no BatchNorm; the convs get biases), an activation name (default relu)
        shortcuts: identity; proj = 1x1 conv stride s + BN (option B, and C when the shape is
                 kept); pad = identity subsampled by the stride with zero channels appended
                 (option A, the paper's CIFAR models, section 4.2). With Keras's `same`, a
                 stride-2 conv on an even size pads bottom/right only, so the main path's
                 windows centre on pixels 1, 3, 5 ... while the shortcut reads 0, 2, 4 ...
                 (what the same block written in Keras does; PyTorch reimplementations pad
                 both sides). The receptive field is the main path's, which holds the shortcut's.
    bn                                batch normalisation over channels
    gn:GROUPS                         group normalisation (Wu & He 2018; Keras GroupNormalization):
                                      per sample over each group of C/GROUPS channels and H, W
    ln                                layer normalisation per sample over (C, H, W), per-channel
                                      gamma and beta: Keras GroupNormalization(groups=1), torch
                                      GroupNorm(1, C). Keras's LayerNormalization() default
                                      (axis=-1) normalises each pixel over its channels instead.
                                      gn and ln: epsilon 1e-3 (Keras's); on flat features too
    relu | sigmoid | tanh | softmax | linear     an activation layer
    dropout:RATE                      0 <= RATE < 1
    flatten                           (C, H, W) -> (C*H*W,)
    gap                               global average pooling, (C, H, W) -> (C,)
    gmp                               global max pooling, (C, H, W) -> (C,)

Hydra passes ':' and 'x' through its override grammar unquoted, so
`model.layers=[conv:6:3:same,relu,gap,dense:10]` works as written. A list
interpolated into a list arrives nested; `parse_layers` flattens it.

This module must not import torch: analysis and config checks run before any
heavy import, so a typo costs milliseconds.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from cnnlab.errors import ConfigError

ACTIVATIONS = ("relu", "sigmoid", "tanh", "softmax", "linear")
PADDINGS = ("same", "valid")
SHORTCUTS = ("proj", "pad")  # a residual block's shortcut when asked for; default: identity or proj
LAYER_NAMES = ("conv", "dwconv", "sepconv", "res", "dense", "maxpool", "avgpool", "bn", "gn", "ln",
               "dropout", "flatten", "gap", "gmp", *ACTIVATIONS)

Pair = tuple[int, int]


@dataclass(frozen=True)
class Conv:
    filters: int
    kernel: Pair
    stride: Pair = (1, 1)
    padding: str = "valid"
    activation: str | None = None
    bias: bool = True


@dataclass(frozen=True)
class DepthwiseConv:
    """Keras DepthwiseConv2D: C -> C*multiplier channels, output c*M + m from input channel c."""

    kernel: Pair
    stride: Pair = (1, 1)
    padding: str = "valid"
    multiplier: int = 1
    activation: str | None = None
    bias: bool = True


@dataclass(frozen=True)
class SeparableConv:
    """Keras SeparableConv2D: a bias-free depthwise conv, then a 1x1 conv to `filters` (bias, activation)."""

    filters: int
    kernel: Pair
    stride: Pair = (1, 1)
    padding: str = "valid"
    multiplier: int = 1
    activation: str | None = None
    bias: bool = True


@dataclass(frozen=True)
class Residual:
    """He et al. 2016's basic block; `shortcut` "auto" is identity when the shape is kept, else "proj"."""

    filters: int
    stride: Pair = (1, 1)
    shortcut: str = "auto"  # "auto" | "proj" | "pad"
    bn: bool = True
    activation: str = "relu"


@dataclass(frozen=True)
class Dense:
    units: int
    activation: str | None = None
    bias: bool = True


@dataclass(frozen=True)
class Pool:
    kind: str  # "max" | "avg"
    size: Pair
    stride: Pair
    padding: str = "valid"


@dataclass(frozen=True)
class BatchNorm:
    pass


@dataclass(frozen=True)
class GroupNorm:
    groups: int


@dataclass(frozen=True)
class LayerNorm:
    pass


@dataclass(frozen=True)
class Activation:
    name: str


@dataclass(frozen=True)
class Dropout:
    rate: float


@dataclass(frozen=True)
class Flatten:
    pass


@dataclass(frozen=True)
class GlobalAvgPool:
    pass


@dataclass(frozen=True)
class GlobalMaxPool:
    pass


LayerSpec = (Conv | DepthwiseConv | SeparableConv | Residual | Dense | Pool | BatchNorm | GroupNorm | LayerNorm
             | Activation | Dropout | Flatten | GlobalAvgPool | GlobalMaxPool)


def _pair_text(p: Pair) -> str:
    return str(p[0]) if p[0] == p[1] else f"{p[0]}x{p[1]}"


def _stride_text(s: Pair, default: Pair = (1, 1)) -> str:
    return "" if s == default else f" s{_pair_text(s)}"


def _conv_tail(spec: Conv | DepthwiseConv | SeparableConv) -> str:
    """', same, x2, relu, no bias': the options every conv-like layer shares, for describe()."""
    mult = f", multiplier {spec.multiplier}" if getattr(spec, "multiplier", 1) != 1 else ""
    act = f", {spec.activation}" if spec.activation else ""
    return f", {spec.padding}{mult}{act}{'' if spec.bias else ', no bias'}"


SHORTCUT_TEXT = {"auto": "", "proj": ", projection", "pad": ", zero-pad"}


def describe(spec: LayerSpec) -> str:
    """Human-readable layer text used in error messages and the summary."""
    match spec:
        case Conv():
            k = spec.kernel
            return f"conv {spec.filters} {k[0]}x{k[1]}{_stride_text(spec.stride)}{_conv_tail(spec)}"
        case DepthwiseConv():
            k = spec.kernel
            return f"dwconv {k[0]}x{k[1]}{_stride_text(spec.stride)}{_conv_tail(spec)}"
        case SeparableConv():
            k = spec.kernel
            return f"sepconv {spec.filters} {k[0]}x{k[1]}{_stride_text(spec.stride)}{_conv_tail(spec)}"
        case Residual():
            act = "" if spec.activation == "relu" else f", {spec.activation}"
            return (f"res {spec.filters}{_stride_text(spec.stride)}{SHORTCUT_TEXT[spec.shortcut]}"
                    f"{'' if spec.bn else ', no bn'}{act}")
        case Dense():
            act = f", {spec.activation}" if spec.activation else ""
            return f"dense {spec.units}{act}{'' if spec.bias else ', no bias'}"
        case Pool():
            k = spec.size
            return f"{spec.kind}pool {k[0]}x{k[1]}{_stride_text(spec.stride, spec.size)}, {spec.padding}"
        case BatchNorm():
            return "bn"
        case GroupNorm():
            return f"gn {spec.groups}"
        case LayerNorm():
            return "ln"
        case Activation():
            return spec.name
        case Dropout():
            return f"dropout {spec.rate:g}"
        case Flatten():
            return "flatten"
        case GlobalAvgPool():
            return "gap"
        case GlobalMaxPool():
            return "gmp"
    raise TypeError(f"not a layer spec: {spec!r}")


def _conv_options(spec: Conv | DepthwiseConv | SeparableConv) -> list[str]:
    """The canonical option fields of a conv-like token: stride, padding, multiplier, activation, nobias."""
    parts = ["s" + _pair_text(spec.stride)] if spec.stride != (1, 1) else []
    parts.append(spec.padding)
    if getattr(spec, "multiplier", 1) != 1:
        parts.append(f"m{spec.multiplier}")
    if spec.activation:
        parts.append(spec.activation)
    if not spec.bias:
        parts.append("nobias")
    return parts


def to_token(spec: LayerSpec) -> str:
    """The canonical token for a spec; `parse_token(to_token(s)) == s`."""
    match spec:
        case Conv():
            return ":".join(["conv", str(spec.filters), _pair_text(spec.kernel), *_conv_options(spec)])
        case DepthwiseConv():
            return ":".join(["dwconv", _pair_text(spec.kernel), *_conv_options(spec)])
        case SeparableConv():
            return ":".join(["sepconv", str(spec.filters), _pair_text(spec.kernel), *_conv_options(spec)])
        case Residual():
            parts = ["res", str(spec.filters)]
            if spec.stride != (1, 1):
                parts.append("s" + _pair_text(spec.stride))
            if spec.shortcut != "auto":
                parts.append(spec.shortcut)
            if not spec.bn:
                parts.append("nobn")
            if spec.activation != "relu":
                parts.append(spec.activation)
            return ":".join(parts)
        case Dense():
            parts = ["dense", str(spec.units)]
            if spec.activation:
                parts.append(spec.activation)
            if not spec.bias:
                parts.append("nobias")
            return ":".join(parts)
        case Pool():
            parts = [f"{spec.kind}pool", _pair_text(spec.size)]
            if spec.stride != spec.size:
                parts.append("s" + _pair_text(spec.stride))
            parts.append(spec.padding)
            return ":".join(parts)
        case GroupNorm():
            return f"gn:{spec.groups}"
        case Dropout():
            return f"dropout:{spec.rate:g}"
        case BatchNorm() | LayerNorm() | Activation() | Flatten() | GlobalAvgPool() | GlobalMaxPool():
            return describe(spec)  # a bare name
    raise TypeError(f"not a layer spec: {spec!r}")


def _positive_int(text: str, what: str, token: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"layer '{token}': {what} must be a positive integer, got '{text}'") from None
    if value < 1:
        raise ConfigError(f"layer '{token}': {what} must be a positive integer, got {value}")
    return value


def _pair(text: str, what: str, token: str) -> Pair:
    """'5' -> (5, 5); '5x3' -> (5, 3) (height x width)."""
    parts = text.lower().split("x")
    if len(parts) not in (1, 2) or not all(parts):
        raise ConfigError(f"layer '{token}': {what} must be N or HxW, got '{text}'")
    values = [_positive_int(p, what, token) for p in parts]
    return (values[0], values[-1])


OPTION_KINDS = ("stride", "padding", "multiplier", "shortcut", "bn", "activation", "bias")


def _options(token: str, fields: list[str], allowed: set[str]) -> dict[str, str]:
    """Sort option fields by kind; each kind may appear once."""
    found: dict[str, str] = {}
    for field in fields:
        if field in PADDINGS:
            kind = "padding"
        elif field in ACTIVATIONS:
            kind = "activation"
        elif field == "nobias":
            kind = "bias"
        elif field == "nobn":
            kind = "bn"
        elif field in SHORTCUTS:
            kind = "shortcut"
        elif field[:1] == "s" and field[1:2].isdigit():
            kind = "stride"
        elif field[:1] == "m" and field[1:2].isdigit():
            kind = "multiplier"
        else:
            kind = "unknown"
        if kind not in allowed:
            allowed_text = _allowed_options_text(allowed)
            raise ConfigError(f"layer '{token}': unknown option '{field}'; allowed: {allowed_text}")
        if kind in found:
            raise ConfigError(f"layer '{token}': {kind} given twice ('{found[kind]}', '{field}')")
        found[kind] = field
    return found


def _allowed_options_text(allowed: set[str]) -> str:
    texts = {
        "stride": "sN or sNxM (stride)",
        "padding": "same|valid",
        "multiplier": "mN (depth multiplier)",
        "shortcut": "proj|pad (shortcut)",
        "bn": "nobn",
        "activation": "|".join(ACTIVATIONS),
        "bias": "nobias",
    }
    return ", ".join(texts[k] for k in OPTION_KINDS if k in allowed)


def _expect_fields(token: str, fields: list[str], minimum: int, usage: str) -> None:
    if len(fields) < minimum:
        raise ConfigError(f"layer '{token}': expected {usage}")


CONV_OPTIONS = {"stride", "padding", "activation", "bias"}


def _conv_kwargs(text: str, opts: dict[str, str]) -> dict:
    """stride, padding, activation and bias of a conv-like token, with Keras's defaults."""
    return dict(stride=_pair(opts["stride"][1:], "stride", text) if "stride" in opts else (1, 1),
                padding=opts.get("padding", "valid"), activation=opts.get("activation"),
                bias="bias" not in opts)


def parse_token(token: object) -> LayerSpec:
    """Parse one token such as 'conv:6:5:same' into a typed spec."""
    if not isinstance(token, str):
        raise ConfigError(f"layer {token!r}: expected a string token such as 'conv:6:5:same', "
                          f"got {type(token).__name__}")
    text = token.strip()
    name, *fields = text.split(":")
    name = name.lower()
    if name == "conv":
        _expect_fields(text, fields, 2, "conv:FILTERS:KERNEL[:sN][:same|valid][:ACTIVATION][:nobias]")
        opts = _options(text, fields[2:], CONV_OPTIONS)
        return Conv(filters=_positive_int(fields[0], "filters", text),
                    kernel=_pair(fields[1], "kernel", text), **_conv_kwargs(text, opts))
    if name == "dwconv":
        _expect_fields(text, fields, 1, "dwconv:KERNEL[:sN][:same|valid][:mM][:ACTIVATION][:nobias]")
        opts = _options(text, fields[1:], CONV_OPTIONS | {"multiplier"})
        multiplier = _positive_int(opts["multiplier"][1:], "depth multiplier", text) if "multiplier" in opts else 1
        return DepthwiseConv(kernel=_pair(fields[0], "kernel", text), multiplier=multiplier,
                             **_conv_kwargs(text, opts))
    if name == "sepconv":
        _expect_fields(text, fields, 2, "sepconv:FILTERS:KERNEL[:sN][:same|valid][:mM][:ACTIVATION][:nobias]")
        opts = _options(text, fields[2:], CONV_OPTIONS | {"multiplier"})
        multiplier = _positive_int(opts["multiplier"][1:], "depth multiplier", text) if "multiplier" in opts else 1
        return SeparableConv(filters=_positive_int(fields[0], "filters", text),
                             kernel=_pair(fields[1], "kernel", text), multiplier=multiplier,
                             **_conv_kwargs(text, opts))
    if name == "res":
        _expect_fields(text, fields, 1, "res:WIDTH[:sN][:proj|pad][:nobn][:ACTIVATION]")
        opts = _options(text, fields[1:], {"stride", "shortcut", "bn", "activation"})
        return Residual(filters=_positive_int(fields[0], "width", text),
                        stride=_pair(opts["stride"][1:], "stride", text) if "stride" in opts else (1, 1),
                        shortcut=opts.get("shortcut", "auto"), bn="bn" not in opts,
                        activation=opts.get("activation", "relu"))
    if name == "dense":
        _expect_fields(text, fields, 1, "dense:UNITS[:ACTIVATION][:nobias]")
        opts = _options(text, fields[1:], {"activation", "bias"})
        return Dense(units=_positive_int(fields[0], "units", text),
                     activation=opts.get("activation"), bias="bias" not in opts)
    if name in ("maxpool", "avgpool"):
        _expect_fields(text, fields, 1, f"{name}:SIZE[:sN][:same|valid]")
        opts = _options(text, fields[1:], {"stride", "padding"})
        size = _pair(fields[0], "pool size", text)
        stride = _pair(opts["stride"][1:], "stride", text) if "stride" in opts else size
        return Pool(kind=name[:3], size=size, stride=stride, padding=opts.get("padding", "valid"))
    if name == "gn":
        if len(fields) != 1:
            raise ConfigError(f"layer '{text}': expected gn:GROUPS (GROUPS divides the channels)")
        return GroupNorm(_positive_int(fields[0], "groups", text))
    if name == "dropout":
        if len(fields) != 1:
            raise ConfigError(f"layer '{text}': expected dropout:RATE with 0 <= RATE < 1")
        try:
            rate = float(fields[0])
        except ValueError:
            raise ConfigError(f"layer '{text}': dropout rate must be a number in [0, 1), "
                              f"got '{fields[0]}'") from None
        if not 0.0 <= rate < 1.0:
            raise ConfigError(f"layer '{text}': dropout rate must be in [0, 1), got {rate:g}")
        return Dropout(rate)
    simple = {"bn": BatchNorm, "ln": LayerNorm, "flatten": Flatten, "gap": GlobalAvgPool, "gmp": GlobalMaxPool}
    if name in simple or name in ACTIVATIONS:
        if fields:
            raise ConfigError(f"layer '{text}': '{name}' takes no options, got '{':'.join(fields)}'")
        return simple[name]() if name in simple else Activation(name)
    raise ConfigError(f"unknown layer '{name}' in '{text}'; allowed: {', '.join(LAYER_NAMES)}")


def _flatten(items: Iterable[object]) -> Iterable[object]:
    for item in items:
        if isinstance(item, (list, tuple)):
            yield from _flatten(item)
        else:
            yield item


def parse_layers(tokens: Iterable[object]) -> list[LayerSpec]:
    """Parse a (possibly nested) list of tokens. Errors name the layer's index."""
    if isinstance(tokens, str):
        raise ConfigError(f"layers must be a list of tokens like [conv:6:5:same, relu], got the "
                          f"string '{tokens}'")
    specs = []
    for index, token in enumerate(_flatten(tokens)):
        try:
            specs.append(parse_token(token))
        except ConfigError as error:
            raise ConfigError(f"layer {index}: {error}") from None
    if not specs:
        raise ConfigError("the layer list is empty")
    return specs
