"""Model configs -> layer tokens.

A model config is either an explicit layer list (`layers: [...]`) or a
*family*: a few knobs that expand to one, so an ablation is a one-word
override (`model.kernels=[3,3]`, `model.bn=false`, `model.pool=avg`).

A family of B blocks expands to, per block b:

    for each k in kernels:  conv:W_b:k:PADDING  then  bn, ACT   (bn on)
                                                 or  conv:...:ACT (bn off)
    POOL:POOL_SIZE:POOL_PADDING     (unless pool=none)
    dropout:DROPOUT                 (unless dropout=0)

then the head: flatten (or gap), for each D in dense: dense:D:ACT and
dropout, and finally dense:CLASSES:softmax. The chapter's baseline is
blocks=1, widths=[6], kernels=[5], padding=same, bn=true, pool=max,
pool_padding=same, dropout=0.2, dense=[128].
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cnnlab.errors import ConfigError
from cnnlab.spec import ACTIVATIONS, PADDINGS, LayerSpec, parse_layers

COMMON_KEYS = {"name", "init", "bn_momentum", "bn_eps"}
FAMILY_KEYS = {"blocks", "widths", "kernels", "padding", "bn", "activation", "pool",
               "pool_size", "pool_padding", "dropout", "head", "dense"}
POOLS = ("max", "avg", "none")
HEADS = ("flatten", "gap")
INITS = ("keras", "torch")  # cnnlab.build's initialisations (build imports torch; this module must not)


def _int(cfg: Mapping, key: str, minimum: int = 1) -> int:
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"model.{key} must be an integer >= {minimum}, got {value!r}")
    return value


def _choice(cfg: Mapping, key: str, allowed: tuple[str, ...]) -> str:
    value = cfg[key]
    if value not in allowed:
        raise ConfigError(f"model.{key} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def _int_list(cfg: Mapping, key: str, allow_empty: bool = False) -> list[int]:
    value = cfg[key]
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)) or (not value and not allow_empty) or any(
            isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value):
        raise ConfigError(f"model.{key} must be a list of positive integers, got {value!r}")
    return list(value)


def _kernels(cfg: Mapping) -> list[str]:
    value = cfg["kernels"]
    if not isinstance(value, (list, tuple)):
        value = [value]
    if not value:
        raise ConfigError("model.kernels must list at least one kernel, e.g. [5] or [3,3]")
    return [str(k) for k in value]  # '5' or '5x3'; parse_layers checks them


def expand_family(cfg: Mapping[str, Any], num_classes: int) -> list[str]:
    """The layer tokens a family config stands for."""
    missing = sorted(FAMILY_KEYS - set(cfg))
    if missing:
        raise ConfigError(f"model config '{cfg.get('name')}' lacks {', '.join(missing)}; "
                          f"a family needs all of {', '.join(sorted(FAMILY_KEYS))}")
    blocks = _int(cfg, "blocks")
    widths = _int_list(cfg, "widths")
    if len(widths) not in (1, blocks):
        raise ConfigError(f"model.widths has {len(widths)} entries for {blocks} blocks; give one "
                          f"width for all blocks or one per block")
    widths = widths * blocks if len(widths) == 1 else widths
    kernels = _kernels(cfg)
    padding = _choice(cfg, "padding", PADDINGS)
    activation = _choice(cfg, "activation", ACTIVATIONS)
    pool = _choice(cfg, "pool", POOLS)
    pool_padding = _choice(cfg, "pool_padding", PADDINGS)
    head = _choice(cfg, "head", HEADS)
    dense = _int_list(cfg, "dense", allow_empty=True)
    if not isinstance(cfg["bn"], bool):
        raise ConfigError(f"model.bn must be true or false, got {cfg['bn']!r}")
    dropout = cfg["dropout"]
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ConfigError(f"model.dropout must be a number in [0, 1), got {dropout!r}")

    tokens: list[str] = []
    for width in widths:
        for kernel in kernels:
            if cfg["bn"]:
                tokens += [f"conv:{width}:{kernel}:{padding}", "bn", activation]
            else:
                tokens.append(f"conv:{width}:{kernel}:{padding}:{activation}")
        if pool != "none":
            tokens.append(f"{pool}pool:{_int(cfg, 'pool_size')}:{pool_padding}")
        if dropout:
            tokens.append(f"dropout:{dropout:g}")
    tokens.append(head)
    for units in dense:
        tokens.append(f"dense:{units}:{activation}")
        if dropout:
            tokens.append(f"dropout:{dropout:g}")
    tokens.append(f"dense:{num_classes}:softmax")
    return tokens


def check_common(cfg: Mapping[str, Any]) -> None:
    """init and BatchNorm settings, which build() reads only after the data is loaded."""
    if cfg.get("init", "keras") not in INITS:
        raise ConfigError(f"model.init must be one of {', '.join(INITS)}, got {cfg.get('init')!r}")
    momentum = cfg.get("bn_momentum", 0.99)
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
        raise ConfigError(f"model.bn_momentum must be a number in [0, 1) (Keras's convention: the "
                          f"fraction of the old moving statistic kept), got {momentum!r}")
    eps = cfg.get("bn_eps", 1e-3)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < float("inf"):
        raise ConfigError(f"model.bn_eps must be a finite number > 0, got {eps!r}")


def model_tokens(cfg: Mapping[str, Any], num_classes: int) -> list[Any]:
    """Layer tokens of a model config, explicit or family; unknown keys are errors."""
    keys = set(cfg)
    explicit = "layers" in keys
    allowed = COMMON_KEYS | ({"layers"} if explicit else FAMILY_KEYS)
    unknown = sorted(keys - allowed)
    if unknown:
        kind = "an explicit layer list" if explicit else "a family"
        raise ConfigError(f"model config '{cfg.get('name')}' is {kind} and has unknown key(s) "
                          f"{', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
    check_common(cfg)
    if explicit:
        layers = cfg["layers"]
        if isinstance(layers, str) or not isinstance(layers, (list, tuple)):
            raise ConfigError(f"model.layers must be a list of tokens such as "
                              f"[conv:6:5:same, relu, flatten, dense:10], got {layers!r}")
        return list(layers)  # parse_layers flattens nesting and checks each token
    return expand_family(cfg, num_classes)


def model_specs(cfg: Mapping[str, Any], num_classes: int) -> list[LayerSpec]:
    return parse_layers(model_tokens(cfg, num_classes))
