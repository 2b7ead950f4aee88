"""The layer language: tokens -> typed specs, and its errors."""

import sys

import pytest

from cnnlab.errors import ConfigError
from cnnlab.model.family import model_tokens
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
    parse_layers,
    parse_token,
    to_token,
)


def test_tokens_parse_to_keras_defaults():
    assert parse_token("conv:6:5") == Conv(6, (5, 5), (1, 1), "valid", None, True)
    assert parse_token("conv:8:5x3:s2x1:same:relu:nobias") == Conv(
        8, (5, 3), (2, 1), "same", "relu", False)
    assert parse_token("maxpool:2") == Pool("max", (2, 2), (2, 2), "valid")
    assert parse_token("avgpool:3:s1:same") == Pool("avg", (3, 3), (1, 1), "same")
    assert parse_token("dense:10:softmax") == Dense(10, "softmax", True)
    assert parse_token("dropout:0.2") == Dropout(0.2)
    assert [parse_token(t) for t in ("bn", "flatten", "gap", "tanh")] == [
        BatchNorm(), Flatten(), GlobalAvgPool(), Activation("tanh")]


def test_new_tokens_parse_to_keras_defaults():
    assert parse_token("dwconv:3") == DepthwiseConv((3, 3), (1, 1), "valid", 1, None, True)
    assert parse_token("dwconv:5x3:s2:same:m2:relu:nobias") == DepthwiseConv((5, 3), (2, 2), "same", 2, "relu", False)
    assert parse_token("sepconv:32:3") == SeparableConv(32, (3, 3), (1, 1), "valid", 1, None, True)
    assert parse_token("sepconv:8:3:m4:same:tanh") == SeparableConv(8, (3, 3), (1, 1), "same", 4, "tanh", True)
    assert parse_token("res:16") == Residual(16, (1, 1), "auto", True, "relu")
    assert parse_token("res:32:s2:pad") == Residual(32, (2, 2), "pad", True, "relu")
    assert parse_token("res:64:nobn:proj:s2x1:tanh") == Residual(64, (2, 1), "proj", False, "tanh")
    assert [parse_token(t) for t in ("gn:4", "ln", "gmp")] == [GroupNorm(4), LayerNorm(), GlobalMaxPool()]


ROUND_TRIPS = ["conv:8:5x3:s2x1:same:relu:nobias", "conv:6:5:valid", "maxpool:2:valid",
               "avgpool:3:s1:same", "dense:10:softmax", "dropout:0.5", "bn", "gap", "relu",
               "dwconv:3:valid", "dwconv:5x3:s2:same:m2:relu:nobias", "sepconv:16:3:same",
               "sepconv:8:3x5:s1x2:valid:m3:tanh:nobias", "res:16", "res:32:s2:pad",
               "res:32:s2x1:proj:nobn:tanh", "res:8:linear", "gn:4", "ln", "gmp"]


def test_to_token_round_trips():
    for token in ROUND_TRIPS:
        assert to_token(parse_token(token)) == token
        assert parse_token(to_token(parse_token(token))) == parse_token(token)
    # options in any order parse to the same spec and come back canonical
    assert to_token(parse_token("res:32:nobn:pad:s2")) == "res:32:s2:pad:nobn"
    assert to_token(parse_token("dwconv:3:relu:m2:same")) == "dwconv:3:same:m2:relu"
    assert to_token(parse_token("res:16:relu")) == "res:16"  # relu is the block's default


def test_describe_new_tokens():
    assert [describe(parse_token(t)) for t in ROUND_TRIPS[9:]] == [
        "dwconv 3x3, valid", "dwconv 5x3 s2, same, multiplier 2, relu, no bias", "sepconv 16 3x3, same",
        "sepconv 8 3x5 s1x2, valid, multiplier 3, tanh, no bias", "res 16", "res 32 s2, zero-pad",
        "res 32 s2x1, projection, no bn, tanh", "res 8, linear", "gn 4", "ln", "gmp"]


def test_nested_lists_flatten():
    # An interpolated list inside a list arrives nested from Hydra.
    assert parse_layers([["conv:4:3", "relu"], "flatten", [["dense:2"]]]) == [
        Conv(4, (3, 3)), Activation("relu"), Flatten(), Dense(2)]


@pytest.mark.parametrize("token, fragment", [
    ("convolution:6:5", "unknown layer 'convolution'"),
    ("conv:0:5", "filters must be a positive integer, got 0"),
    ("conv:-3:5", "filters must be a positive integer, got -3"),
    ("conv:6:0", "kernel must be a positive integer, got 0"),
    ("conv:6:5:s0", "stride must be a positive integer, got 0"),
    ("conv:6:5:full", "unknown option 'full'"),
    ("conv:6:5:same:valid", "padding given twice"),
    ("conv:6", "expected conv:FILTERS:KERNEL"),
    ("conv:6:5x3x2", "kernel must be N or HxW"),
    ("maxpool:2:relu", "unknown option 'relu'"),
    ("dropout:1.0", "dropout rate must be in [0, 1), got 1"),
    ("dropout:-0.1", "dropout rate must be in [0, 1)"),
    ("dropout:abc", "must be a number in [0, 1)"),
    ("dense:0", "units must be a positive integer, got 0"),
    ("bn:3", "'bn' takes no options"),
    ("ln:2", "'ln' takes no options"),
    ("gmp:2", "'gmp' takes no options"),
    ("gn", "expected gn:GROUPS"),
    ("gn:0", "groups must be a positive integer, got 0"),
    ("dwconv", "expected dwconv:KERNEL"),
    ("dwconv:3:m0", "depth multiplier must be a positive integer, got 0"),
    ("dwconv:3:proj", "unknown option 'proj'; allowed: sN or sNxM (stride), same|valid, mN (depth multiplier)"),
    ("conv:6:3:m2", "unknown option 'm2'"),
    ("sepconv:8", "expected sepconv:FILTERS:KERNEL"),
    ("res", "expected res:WIDTH"),
    ("res:0", "width must be a positive integer, got 0"),
    ("res:16:same", "unknown option 'same'; allowed: sN or sNxM (stride), proj|pad (shortcut), nobn"),
    ("res:16:proj:pad", "shortcut given twice ('proj', 'pad')"),
    ("res:16:nobias", "unknown option 'nobias'"),
])
def test_bad_tokens_name_the_problem(token, fragment):
    with pytest.raises(ConfigError) as info:
        parse_layers(["flatten", token])
    message = str(info.value)
    assert message.startswith("layer 1: ")
    assert fragment in message


def test_non_string_and_empty_lists_are_errors():
    with pytest.raises(ConfigError, match="expected a string token"):
        parse_layers([5])
    with pytest.raises(ConfigError, match="empty"):
        parse_layers([])
    with pytest.raises(ConfigError, match="must be a list of tokens"):
        parse_layers("conv:6:5")


def test_parsing_does_not_import_torch():
    # The language and the analysis must stay cheap: run them in a fresh interpreter.
    import subprocess

    code = ("import sys; from cnnlab.model.shapes import analyse; from cnnlab.model.spec import parse_layers;"
            "analyse(parse_layers(['conv:6:5:same','flatten','dense:10']), (3, 32, 32));"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


BASELINE = dict(name="baseline", init="keras", bn_momentum=0.99, bn_eps=0.001, blocks=1,
                widths=[6], kernels=[5], padding="same", bn=True, activation="relu", pool="max",
                pool_size=2, pool_padding="same", dropout=0.2, head="flatten", dense=[128])


def test_family_expands_to_the_chapter_baseline():
    assert model_tokens(BASELINE, 10) == [
        "conv:6:5:same", "bn", "relu", "maxpool:2:same", "dropout:0.2", "flatten",
        "dense:128:relu", "dropout:0.2", "dense:10:softmax"]


def test_family_knobs_are_one_word_ablations():
    two_3x3 = model_tokens({**BASELINE, "kernels": [3, 3], "bn": False, "dropout": 0}, 10)
    assert two_3x3[:3] == ["conv:6:3:same:relu", "conv:6:3:same:relu", "maxpool:2:same"]
    assert not any(t.startswith("dropout") for t in two_3x3)
    vgg = model_tokens({**BASELINE, "blocks": 2, "widths": [8, 16], "pool": "avg",
                        "head": "gap", "dense": []}, 5)
    assert vgg == ["conv:8:5:same", "bn", "relu", "avgpool:2:same", "dropout:0.2",
                   "conv:16:5:same", "bn", "relu", "avgpool:2:same", "dropout:0.2", "gap",
                   "dense:5:softmax"]


@pytest.mark.parametrize("override, fragment", [
    ({"widths": [6, 8]}, "widths has 2 entries for 1 blocks"),
    ({"padding": "full"}, "model.padding must be one of same, valid, got 'full'"),
    ({"pool": "min"}, "model.pool must be one of max, avg, none"),
    ({"bn": "yes"}, "model.bn must be true or false"),
    ({"dropout": 1.5}, "model.dropout must be a number in [0, 1)"),
    ({"blocks": 0}, "model.blocks must be an integer >= 1, got 0"),
    ({"kernels": []}, "model.kernels must be a list of at least one kernel"),
    ({"colour": "red"}, "unknown key 'model.colour'"),
])
def test_bad_family_knobs(override, fragment):
    with pytest.raises(ConfigError) as info:
        model_tokens({**BASELINE, **override}, 10)
    assert fragment in str(info.value)
