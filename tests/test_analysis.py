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
