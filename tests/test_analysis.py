"""Shapes, receptive field, parameters and MACs from the specs alone (Keras rules)."""

import math

import pytest

from cnnlab.config.compose import compose
from cnnlab.errors import ConfigError
from cnnlab.model.plan import model_plan
from cnnlab.model.shapes import analyse, output_size, same_padding
from cnnlab.model.spec import parse_layers


def test_output_size_formula_matches_the_chapter():
    for n in range(1, 40):
        for k in range(1, 8):
            for s in range(1, 4):
                assert output_size(n, k, s, "same") == math.ceil(n / s)
                assert output_size(n, k, s, "valid") == max(math.ceil((n - k + 1) / s), 0)
                before, after = same_padding(n, k, s)
                total = max((math.ceil(n / s) - 1) * s + k - n, 0)
                assert (before, after) == (total // 2, total - total // 2)


def test_baseline_summary_numbers():
    plan = model_plan(compose(["model=baseline", "data=cifar10"]))
    a = plan.analysis
    assert [layer.params for layer in a.layers] == [456, 24, 0, 0, 0, 0, 196_736, 0, 1_290]
    assert a.layers[3].output_shape == (6, 16, 16)  # 16x16x6 after pooling
    assert (a.total_params, a.trainable, a.non_trainable) == (198_506, 198_494, 12)


def test_summary_composes_overrides():
    plan = model_plan(compose(["model=baseline", "model.bn=false"]))
    assert "bn" not in plan.tokens
    assert plan.analysis.non_trainable == 0


def _single(kernels: list[int]) -> list:
    return parse_layers([f"conv:1:{k}:valid:nobias" for k in kernels])


@pytest.mark.parametrize("x", range(5, 65))
def test_one_5x5_vs_two_3x3(x):
    one, two = analyse(_single([5]), (1, x, x)), analyse(_single([3, 3]), (1, x, x))
    assert (one.trainable, two.trainable) == (25, 18)
    assert one.receptive_field.size == two.receptive_field.size == (5, 5)
    assert one.macs == 25 * x**2 - 200 * x + 400
    assert two.macs == 18 * x**2 - 108 * x + 180
    assert one.output_shape == two.output_shape == (1, x - 4, x - 4)


def test_receptive_field_with_strides_and_pools():
    # 3x3 s1 -> r3 j1; maxpool 2 -> r4 j2; 3x3 -> r8 j2; 3x3 s2 -> r12 j4.
    a = analyse(parse_layers(["conv:4:3", "maxpool:2", "conv:4:3", "conv:4:3:s2"]), (1, 32, 32))
    assert [layer.rf.size[0] for layer in a.layers] == [3, 4, 8, 12]
    assert [layer.rf.jump[0] for layer in a.layers] == [1, 2, 2, 4]
    # valid padding: the first output's field starts at pixel 0, so its centre is size/2.
    assert a.layers[-1].rf.start == (6.0, 6.0)
    same = analyse(parse_layers(["conv:4:3:same"]), (1, 8, 8))
    assert same.layers[0].rf.start == (0.5, 0.5)  # centred on pixel 0 (one pixel of padding)


def test_non_square_kernels_and_strides():
    a = analyse(parse_layers(["conv:2:5x3:s2x1:same", "conv:2:4x2:valid"]), (1, 9, 7))
    assert a.layers[0].output_shape == (2, 5, 7)
    assert a.layers[0].padding == (2, 2, 1, 1)  # total (5-1)*2+5-9 = 4, (7-1)+3-7 = 2
    assert a.layers[1].output_shape == (2, 2, 6)
    assert a.layers[1].macs == 2 * 6 * 2 * 4 * 2 * 2
    even = analyse(parse_layers(["conv:1:2:same"]), (1, 4, 4))
    assert even.layers[0].padding == (0, 1, 0, 1)  # the extra pixel goes bottom/right


def test_lenet_on_32x32_fails_naming_layer_and_sizes():
    with pytest.raises(ConfigError) as info:
        model_plan(compose(["model=lenet"]))
    assert str(info.value) == "layer 5 (maxpool 2x2, valid) needs at least 2x2 input, got 1x1"
    assert model_plan(compose(["model=lenet", "model.blocks=2"])).analysis.output_shape == (10,)


@pytest.mark.parametrize("layers, fragment", [
    (["conv:4:7", "flatten", "dense:10"], "layer 0 (conv 4 7x7, valid) needs at least 7x7 input, got 5x5"),
    (["flatten", "conv:4:3"], "layer 1 (conv 4 3x3, valid) needs a CxHxW map"),
    (["conv:4:3", "dense:10"], "layer 1 (dense 10) needs a flat input, got a 3x3x4 map; add 'flatten'"),
    (["flatten", "flatten"], "layer 1 (flatten) needs a CxHxW map"),
])
def test_impossible_stacks(layers, fragment):
    with pytest.raises(ConfigError) as info:
        analyse(parse_layers(layers), (1, 5, 5))
    assert fragment in str(info.value)


def test_network_must_end_in_class_scores():
    with pytest.raises(ConfigError, match="ends in 16x16x6 but the data has 10 classes"):
        model_plan(compose(["model=custom", "model.layers=[conv:6:5:same,maxpool:2]"]))


def test_new_layers_count_as_keras_does():
    # DepthwiseConv2D(3, strides=2, padding="same", depth_multiplier=2) on 9x9x4: 3*3*4*2 + 8 bias.
    a = analyse(parse_layers(["dwconv:3:s2:same:m2", "sepconv:5:3:valid:m3", "gn:5", "ln", "gmp"]), (4, 9, 9))
    dw, sep, gn, ln, gmp = a.layers
    assert (dw.output_shape, dw.trainable, dw.macs, dw.padding) == ((8, 5, 5), 80, 5 * 5 * 8 * 9, (1, 1, 1, 1))
    # SeparableConv2D(5, 3, depth_multiplier=3) on 5x5x8: 3*3*8*3 depthwise + 24*5 pointwise + 5 bias.
    assert (sep.output_shape, sep.trainable) == ((5, 3, 3), 216 + 120 + 5)
    assert sep.macs == 3 * 3 * (24 * 9 + 24 * 5)
    assert (gn.trainable, gn.non_trainable, ln.trainable) == (10, 0, 10)
    assert gmp.output_shape == (5,) and gmp.rf is None
    assert [layer.rf.size for layer in a.layers[:2]] == [(3, 3), (7, 7)]  # 3 + (3 - 1) * 2


def test_residual_block_counts_and_field():
    # 16 -> 32 channels, stride 2: conv 3x3 16->32, conv 3x3 32->32, 1x1 projection, 3 BNs.
    a = analyse(parse_layers(["res:32:s2"]), (16, 8, 8))
    block = a.layers[0]
    assert block.output_shape == (32, 4, 4)
    assert block.trainable == 9 * 16 * 32 + 9 * 32 * 32 + 16 * 32 + 3 * 2 * 32
    assert block.non_trainable == 3 * 2 * 32
    assert block.macs == 4 * 4 * 32 * (9 * 16 + 9 * 32 + 16)
    assert block.padding == (0, 1, 0, 1)  # Keras: stride 2 on an even size pads bottom/right
    # the main path's two 3x3 convs: 3 + 2 * 2 = 7, jump 2; centred on pixel 1 (padding after)
    assert (block.rf.size, block.rf.jump, block.rf.start) == ((7, 7), (2, 2), (1.5, 1.5))
    pad = analyse(parse_layers(["res:32:s2:pad:nobn"]), (16, 8, 8)).layers[0]
    assert (pad.trainable, pad.non_trainable) == (9 * 16 * 32 + 32 + 9 * 32 * 32 + 32, 0)
    assert pad.macs == 4 * 4 * 32 * 9 * (16 + 32)
    same = analyse(parse_layers(["res:16", "res:16:proj"]), (16, 8, 8)).layers
    assert same[0].trainable == 2 * (9 * 16 * 16 + 2 * 16)  # identity shortcut: no parameters
    assert same[1].trainable == same[0].trainable + 16 * 16 + 2 * 16  # option C: a projection anyway


@pytest.mark.parametrize("layers, fragment", [
    (["conv:6:3", "gn:4"], "layer 1 (gn 4) needs channels divisible by its 4 groups, got 6 channels"),
    (["conv:16:1", "res:8:pad"], "layer 1 (res 8, zero-pad) cannot zero-pad 16 input channels to 8; use proj"),
    (["flatten", "res:8"], "layer 1 (res 8) needs a CxHxW map, got a flat input of 25 features"),
    (["flatten", "dwconv:3"], "layer 1 (dwconv 3x3, valid) needs a CxHxW map"),
    (["gmp", "gmp"], "layer 1 (gmp) needs a CxHxW map"),
    (["gap", "ln"], "layer 1 (ln) would normalise groups of a single value (input 1, 1 group); a group needs"),
    (["conv:2:5", "gn:2"], "layer 1 (gn 2) would normalise groups of a single value (input 1x1x2, 2 groups)"),
    (["sepconv:4:7"], "layer 0 (sepconv 4 7x7, valid) needs at least 7x7 input, got 5x5"),
])
def test_impossible_new_stacks(layers, fragment):
    with pytest.raises(ConfigError) as info:
        analyse(parse_layers(layers), (1, 5, 5))
    assert fragment in str(info.value)
