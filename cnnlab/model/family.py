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

The resnet family (conf/model/resnet.yaml) is He et al. 2016's CIFAR ResNet
(section 4.2): a stem conv, stages of n basic blocks (`res` tokens) whose
first block halves the map from the second stage on, global average pooling,
dropout if asked, and the classifier:

    conv:W0:STEM_KERNEL:same:nobias, bn, relu      (bn off: conv:W0:K:same:relu)
    per stage i, per block b:  res:W_i[:s2 on the first block of stages 1..][:SHORTCUT][:nobn]
    gap, [dropout:DROPOUT], dense:CLASSES:softmax

depth = 2 + 2 * stages * n (20, 32, 44, 56, 110 for 3 stages) or `blocks` per
stage. SHORTCUT follows the paper's options: A pads the identity with zeros
where the shape changes (`pad`), B projects there (the token's default), C
projects in every block (`proj`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cnnlab.config.schema import MODEL_FAMILY, MODEL_LAYERS, MODEL_RESNET
from cnnlab.model.spec import LayerSpec, parse_layers


def expand_family(cfg: Mapping[str, Any], num_classes: int) -> list[str]:
    """The layer tokens a family config stands for."""
    blocks, dropout, activation = cfg["blocks"], cfg["dropout"], cfg["activation"]
    widths = cfg["widths"] if isinstance(cfg["widths"], (list, tuple)) else [cfg["widths"]]
    widths = list(widths) * blocks if len(widths) == 1 else list(widths)
    kernels = [str(k) for k in (cfg["kernels"] if isinstance(cfg["kernels"], (list, tuple)) else [cfg["kernels"]])]
    padding, pool, pool_padding = cfg["padding"], cfg["pool"], cfg["pool_padding"]
    dense = cfg["dense"] if isinstance(cfg["dense"], (list, tuple)) else [cfg["dense"]]

    tokens: list[str] = []
    for width in widths:
        for kernel in kernels:
            if cfg["bn"]:
                tokens += [f"conv:{width}:{kernel}:{padding}", "bn", activation]
            else:
                tokens.append(f"conv:{width}:{kernel}:{padding}:{activation}")
        if pool != "none":
            tokens.append(f"{pool}pool:{cfg['pool_size']}:{pool_padding}")
        if dropout:
            tokens.append(f"dropout:{dropout:g}")
    tokens.append(cfg["head"])
    for units in dense:
        tokens.append(f"dense:{units}:{activation}")
        if dropout:
            tokens.append(f"dropout:{dropout:g}")
    tokens.append(f"dense:{num_classes}:softmax")
    return tokens


def expand_resnet(cfg: Mapping[str, Any], num_classes: int) -> list[str]:
    """The layer tokens of a CIFAR ResNet (He et al. 2016, section 4.2)."""
    widths, bn = list(cfg["widths"]), cfg["bn"]
    blocks = cfg["blocks"] or [(cfg["depth"] - 2) // (2 * len(widths))] * len(widths)
    stem = f"conv:{widths[0]}:{cfg['stem_kernel']}:same"
    tokens = [f"{stem}:nobias", "bn", "relu"] if bn else [f"{stem}:relu"]
    channels = widths[0]
    for stage, (width, count) in enumerate(zip(widths, blocks)):
        for block in range(count):
            stride = 2 if stage > 0 and block == 0 else 1
            options = [f"s{stride}"] if stride > 1 else []
            reshapes = stride > 1 or width != channels
            if cfg["shortcut"] == "C" or (cfg["shortcut"] == "A" and reshapes):
                options.append("proj" if cfg["shortcut"] == "C" else "pad")
            if not bn:
                options.append("nobn")
            tokens.append(":".join(["res", str(width), *options]))
            channels = width
    tokens.append("gap")
    if cfg["dropout"]:
        tokens.append(f"dropout:{cfg['dropout']:g}")
    tokens.append(f"dense:{num_classes}:softmax")
    return tokens


def model_tokens(cfg: Mapping[str, Any], num_classes: int) -> list[Any]:
    """Layer tokens of a model config, explicit (`layers`) or a family; checked by its schema.

    Which schema is told by a key only it has: `layers`, or the resnet family's `shortcut`."""
    if "layers" in cfg:
        MODEL_LAYERS.check(cfg)
        return list(cfg["layers"])  # parse_layers flattens nesting and checks each token
    if "shortcut" in cfg:
        MODEL_RESNET.check(cfg)
        return expand_resnet(cfg, num_classes)
    MODEL_FAMILY.check(cfg)
    return expand_family(cfg, num_classes)


def model_specs(cfg: Mapping[str, Any], num_classes: int) -> list[LayerSpec]:
    return parse_layers(model_tokens(cfg, num_classes))
