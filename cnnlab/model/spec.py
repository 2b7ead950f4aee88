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
    bn                                batch normalisation over channels
    relu | sigmoid | tanh | softmax | linear     an activation layer
    dropout:RATE                      0 <= RATE < 1
    flatten                           (C, H, W) -> (C*H*W,)
    gap                               global average pooling, (C, H, W) -> (C,)

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
LAYER_NAMES = ("conv", "dense", "maxpool", "avgpool", "bn", "dropout", "flatten", "gap",
               *ACTIVATIONS)

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


LayerSpec = Conv | Dense | Pool | BatchNorm | Activation | Dropout | Flatten | GlobalAvgPool


def _pair_text(p: Pair) -> str:
    return str(p[0]) if p[0] == p[1] else f"{p[0]}x{p[1]}"


def describe(spec: LayerSpec) -> str:
    """Human-readable layer text used in error messages and the summary."""
    match spec:
        case Conv():
            act = f", {spec.activation}" if spec.activation else ""
            bias = "" if spec.bias else ", no bias"
            k, s = spec.kernel, spec.stride
            stride = "" if s == (1, 1) else f" s{_pair_text(s)}"
            return f"conv {spec.filters} {k[0]}x{k[1]}{stride}, {spec.padding}{act}{bias}"
        case Dense():
            act = f", {spec.activation}" if spec.activation else ""
            return f"dense {spec.units}{act}{'' if spec.bias else ', no bias'}"
        case Pool():
            k = spec.size
            stride = "" if spec.stride == spec.size else f" s{_pair_text(spec.stride)}"
            return f"{spec.kind}pool {k[0]}x{k[1]}{stride}, {spec.padding}"
        case BatchNorm():
            return "bn"
        case Activation():
            return spec.name
        case Dropout():
            return f"dropout {spec.rate:g}"
        case Flatten():
            return "flatten"
        case GlobalAvgPool():
            return "gap"
    raise TypeError(f"not a layer spec: {spec!r}")


def to_token(spec: LayerSpec) -> str:
    """The canonical token for a spec; `parse_token(to_token(s)) == s`."""
    match spec:
        case Conv():
            parts = ["conv", str(spec.filters), _pair_text(spec.kernel)]
            if spec.stride != (1, 1):
                parts.append("s" + _pair_text(spec.stride))
            parts.append(spec.padding)
            if spec.activation:
                parts.append(spec.activation)
            if not spec.bias:
                parts.append("nobias")
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
        case BatchNorm():
            return "bn"
        case Activation():
            return spec.name
        case Dropout():
            return f"dropout:{spec.rate:g}"
        case Flatten():
            return "flatten"
        case GlobalAvgPool():
            return "gap"
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
        elif field[:1] == "s" and field[1:2].isdigit():
            kind = "stride"
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
        "activation": "|".join(ACTIVATIONS),
        "bias": "nobias",
    }
    return ", ".join(texts[k] for k in ("stride", "padding", "activation", "bias") if k in allowed)


def _expect_fields(token: str, fields: list[str], minimum: int, usage: str) -> None:
    if len(fields) < minimum:
        raise ConfigError(f"layer '{token}': expected {usage}")


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
        opts = _options(text, fields[2:], {"stride", "padding", "activation", "bias"})
        return Conv(
            filters=_positive_int(fields[0], "filters", text),
            kernel=_pair(fields[1], "kernel", text),
            stride=_pair(opts["stride"][1:], "stride", text) if "stride" in opts else (1, 1),
            padding=opts.get("padding", "valid"),
            activation=opts.get("activation"),
            bias="bias" not in opts,
        )
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
    simple = {"bn": BatchNorm, "flatten": Flatten, "gap": GlobalAvgPool}
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
