"""The built module agrees with the analysis, and with TensorFlow's numerics."""

import random

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from cnnlab.config.compose import compose
from cnnlab.errors import ConfigError
from cnnlab.model.build import build
from cnnlab.model.plan import model_plan
from cnnlab.model.shapes import analyse, same_padding
from cnnlab.model.spec import Conv, Pool, parse_layers


def _random_stack(rng: random.Random) -> tuple[list, tuple[int, int, int]]:
    shape = (rng.randint(1, 3), rng.randint(6, 20), rng.randint(6, 20))
    tokens: list[str] = []
    for _ in range(rng.randint(1, 5)):
        pad = rng.choice(["same", "valid"])
        k = rng.choice([str(rng.randint(1, 7)), f"{rng.randint(1, 7)}x{rng.randint(1, 7)}"])
        s = rng.choice(["", f":s{rng.randint(1, 3)}", f":s{rng.randint(1, 3)}x{rng.randint(1, 3)}"])
        candidate = rng.choice([
            f"conv:{rng.randint(1, 5)}:{k}{s}:{pad}" + rng.choice(["", ":relu", ":nobias"]),
            f"{rng.choice(['max', 'avg'])}pool:{rng.randint(1, 3)}{s}:{pad}",
            "bn", rng.choice(["relu", "sigmoid", "tanh"]), "dropout:0.3",
        ])
        try:  # keep only layers that fit; the analysis decides
            analyse(parse_layers(tokens + [candidate]), shape)
            tokens.append(candidate)
        except ConfigError:
            pass
    tokens += [rng.choice(["flatten", "gap"]), "bn", f"dense:{rng.randint(2, 6)}:softmax"]
    return parse_layers(tokens), shape


@pytest.mark.parametrize("seed", range(300))
def test_random_stacks_agree_with_the_module(seed):
    rng = random.Random(seed)
    specs, shape = _random_stack(rng)
    analysis = analyse(specs, shape)
    net = build(analysis, init="torch").eval()
    seen = {}
    for name, module in net.named_children():
        if "_" not in name:  # conv3, bn4 ...; fused activations are named conv3_relu
            index = int("".join(ch for ch in name if ch.isdigit()))
            module.register_forward_hook(lambda m, i, o, index=index: seen.__setitem__(index, o.shape))
    with FlopCounterMode(display=False) as counter:
        out = net(torch.randn(1, *shape))
    assert {i: tuple(s[1:]) for i, s in seen.items()} == {
        layer.index: layer.output_shape for layer in analysis.layers}
    assert tuple(out.shape) == (1, *analysis.output_shape)
    assert sum(p.numel() for p in net.parameters()) == analysis.trainable
    moving = sum(b.numel() for n, b in net.named_buffers() if n.endswith(("running_mean", "running_var")))
    assert moving == analysis.non_trainable
    # FlopCounterMode counts 2 FLOPs per multiply-accumulate of conv and matmul.
    assert counter.get_total_flops() == 2 * analysis.macs


def _tf_window(x: np.ndarray, spec: Conv | Pool, reduce) -> np.ndarray:
    """Naive TensorFlow semantics over an unpadded (H, W) map: windows clipped to real pixels."""
    k = spec.kernel if isinstance(spec, Conv) else spec.size
    (h, w), (sh, sw) = x.shape, spec.stride
    if spec.padding == "same":
        (top, _), (left, _) = same_padding(h, k[0], sh), same_padding(w, k[1], sw)
        oh, ow = -(-h // sh), -(-w // sw)
    else:
        top = left = 0
        oh, ow = -(-(h - k[0] + 1) // sh), -(-(w - k[1] + 1) // sw)
    out = np.zeros((oh, ow))
    for i in range(oh):
        for j in range(ow):
            r0, c0 = i * sh - top, j * sw - left
            rows = [r for r in range(r0, r0 + k[0]) if 0 <= r < h]
            cols = [c for c in range(c0, c0 + k[1]) if 0 <= c < w]
            out[i, j] = reduce(x[np.ix_(rows, cols)], [r - r0 for r in rows], [c - c0 for c in cols])
    return out


@pytest.mark.parametrize("seed", range(40))
def test_numerics_match_a_naive_tensorflow_reference(seed):
    rng = np.random.default_rng(seed)
    h, w = rng.integers(4, 11, size=2)
    kh, kw, sh, sw = rng.integers(1, 5), rng.integers(1, 5), rng.integers(1, 4), rng.integers(1, 4)
    pad = rng.choice(["same", "valid"])
    if pad == "valid" and (h < kh or w < kw):
        pad = "same"
    x = rng.normal(size=(h, w)) - 3.0  # mostly negative: zero padding would win a max
    for token, reduce in [
        (f"maxpool:{kh}x{kw}:s{sh}x{sw}:{pad}", lambda v, r, c: v.max()),
        (f"avgpool:{kh}x{kw}:s{sh}x{sw}:{pad}", lambda v, r, c: v.mean()),
    ]:
        spec = parse_layers([token])
        net = build(analyse(spec, (1, h, w)))
        got = net(torch.tensor(x, dtype=torch.float64).view(1, 1, h, w).float())[0, 0]
        want = _tf_window(x, spec[0], reduce)
        np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-5, atol=1e-5)
    spec = parse_layers([f"conv:1:{kh}x{kw}:s{sh}x{sw}:{pad}:nobias"])
    net = build(analyse(spec, (1, h, w)))
    kernel = net[0].weight.detach().double().numpy()[0, 0]
    want = _tf_window(x, spec[0], lambda v, r, c: (v * kernel[np.ix_(r, c)]).sum())
    got = net(torch.tensor(x).view(1, 1, h, w).float())[0, 0]
    np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-4, atol=1e-4)


def test_stride2_same_conv_on_even_input_pads_bottom_right():
    net = build(analyse(parse_layers(["conv:1:3:s2:same:nobias"]), (1, 4, 4)))
    torch.nn.init.ones_(net[0].weight)
    out = net(torch.ones(1, 1, 4, 4))[0, 0]
    # Total padding 1 per axis, all of it after: the top-left window is fully inside.
    assert out.tolist() == [[9.0, 6.0], [6.0, 4.0]]


def test_same_max_pool_on_negative_input_never_picks_padding():
    x = -torch.arange(1.0, 10.0).view(1, 1, 3, 3)  # all negative
    out = build(analyse(parse_layers(["maxpool:2:same"]), (1, 3, 3)))(x)[0, 0]
    assert out.tolist() == [[-1.0, -3.0], [-7.0, -9.0]]


def test_same_avg_pool_divides_by_real_pixels_at_the_border():
    x = torch.arange(1.0, 10.0).view(1, 1, 3, 3)
    out = build(analyse(parse_layers(["avgpool:2:same"]), (1, 3, 3)))(x)[0, 0]
    assert out.tolist() == [[3.0, 4.5], [7.5, 9.0]]  # (1+2+4+5)/4, (3+6)/2, (7+8)/2, 9/1
    sym = build(analyse(parse_layers(["avgpool:3:s1:same"]), (1, 3, 3)))(x)[0, 0]
    assert sym[0, 0].item() == pytest.approx((1 + 2 + 4 + 5) / 4)


def test_keras_init_and_bn_conventions():
    plan = model_plan(compose(["model=baseline"]))
    net = build(plan.analysis, init="keras", bn_momentum=0.99, bn_eps=1e-3)
    conv, bn, dense = net.conv0, net.bn1, net.dense6
    assert torch.count_nonzero(conv.bias) == 0 and torch.count_nonzero(dense.bias) == 0
    limit = (6 / (5 * 5 * 3 + 5 * 5 * 6)) ** 0.5  # Glorot-uniform bound with Keras's fans
    assert conv.weight.abs().max() <= limit and conv.weight.abs().max() > 0.9 * limit
    assert bn.momentum == pytest.approx(0.01) and bn.eps == pytest.approx(1e-3)
    torch_default = build(plan.analysis, init="torch")
    assert torch.count_nonzero(torch_default.conv0.bias) > 0


def test_logits_drop_only_a_final_softmax():
    plan = model_plan(compose(["model=baseline"]))
    probs = build(plan.analysis).eval()
    logits = build(plan.analysis, logits=True).eval()
    logits.load_state_dict(probs.state_dict())
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(probs(x), torch.softmax(logits(x), dim=1))


def test_bad_builder_settings():
    # Checked once, by the model group's schema, before anything is built.
    from cnnlab.config.schema import MODEL_LAYERS

    model = {"name": "m", "init": "keras", "bn_momentum": 0.99, "bn_eps": 1e-3, "layers": ["flatten", "dense:2"]}
    with pytest.raises(ConfigError, match="model.init must be one of keras, torch, got 'xavier'"):
        MODEL_LAYERS.check({**model, "init": "xavier"})
    with pytest.raises(ConfigError, match="bn_momentum"):
        MODEL_LAYERS.check({**model, "bn_momentum": 1.5})


def test_keras_init_of_depthwise_and_separable_convs():
    # Keras's DepthwiseConv2D kernel is (kh, kw, C, M): Glorot fans kh*kw*C and kh*kw*M.
    net = build(analyse(parse_layers(["dwconv:3:m2", "sepconv:5:3:m3"]), (4, 9, 9)), init="keras")
    for conv, (c, m) in [(net.dwconv0, (4, 2)), (net.sepconv1.depthwise, (8, 3))]:
        limit = (6 / (9 * c + 9 * m)) ** 0.5
        assert 0.9 * limit < conv.weight.abs().max() <= limit
    limit = (6 / (24 + 5)) ** 0.5  # the pointwise kernel (1, 1, C*M, F)
    assert 0.9 * limit < net.sepconv1.pointwise.weight.abs().max() <= limit
    assert torch.count_nonzero(net.dwconv0.bias) == 0 and net.sepconv1.depthwise.bias is None


def test_depthwise_output_order_is_keras_s():
    # Keras: output channel c*M + m is input channel c convolved with kernel[..., c, m].
    net = build(analyse(parse_layers(["dwconv:3:same:m2:nobias"]), (3, 5, 5)), init="torch").double()
    x = torch.randn(1, 3, 5, 5, dtype=torch.float64)
    out = net(x)
    for c in range(3):
        for m in range(2):
            w = net.dwconv0.weight[c * 2 + m: c * 2 + m + 1]  # (1, 1, 3, 3)
            want = torch.nn.functional.conv2d(x[:, c:c + 1], w, padding=1)
            torch.testing.assert_close(out[:, c * 2 + m: c * 2 + m + 1], want)


def test_group_and_layer_norm_numerics():
    net = build(analyse(parse_layers(["gn:2", "ln", "flatten", "ln"]), (4, 3, 5)), init="torch").double()
    g = torch.Generator().manual_seed(0)
    for m in (net.gn0, net.ln1, net.ln3):
        torch.nn.init.uniform_(m.weight, 0.5, 2.0, generator=g)
        torch.nn.init.uniform_(m.bias, -1.0, 1.0, generator=g)
    x = torch.randn(2, 4, 3, 5, dtype=torch.float64, generator=g)

    def norm(v, dims, eps=1e-3):  # Keras's epsilon; biased variance as Keras and torch
        return (v - v.mean(dims, keepdim=True)) / (v.var(dims, unbiased=False, keepdim=True) + eps).sqrt()

    per_channel = (1, -1, 1, 1)
    gn = norm(x.view(2, 2, 2, 3, 5), (2, 3, 4)).view(2, 4, 3, 5)  # 2 groups of 2 channels
    gn = gn * net.gn0.weight.view(per_channel) + net.gn0.bias.view(per_channel)
    torch.testing.assert_close(net.gn0(x), gn)
    ln = norm(gn, (1, 2, 3)) * net.ln1.weight.view(per_channel) + net.ln1.bias.view(per_channel)
    torch.testing.assert_close(net.ln1(gn), ln)  # over (C, H, W) per sample, gamma/beta per channel
    flat = ln.flatten(1)
    layer_norm = torch.nn.functional.layer_norm(flat, (60,), net.ln3.weight, net.ln3.bias, eps=1e-3)
    torch.testing.assert_close(net.ln3(flat), layer_norm)  # on features: exactly a LayerNorm


def test_zero_pad_shortcut_is_option_a():
    # res:8:s2:pad on 4 channels: the input subsampled at 0, 2, 4 ... plus 4 zero channels after.
    net = build(analyse(parse_layers(["res:8:s2:pad:nobn:linear"]), (4, 6, 6)), init="torch").double()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    block = net.res0
    main = block.conv2(block.conv1(x))
    want = main + torch.cat([x[:, :, ::2, ::2], torch.zeros(2, 4, 3, 3, dtype=torch.float64)], dim=1)
    torch.testing.assert_close(net(x), want)
    assert torch.equal(block.shortcut(x)[:, 4:], torch.zeros(2, 4, 3, 3, dtype=torch.float64))


@pytest.mark.parametrize("kernel", [2, 3, (2, 3), (1, 2), (3, 1)])
@pytest.mark.parametrize("values", ["ties", "normal", "relu"])
def test_tiled_max_pool_is_max_pool2d_exactly_gradients_and_ties_included(kernel, values):
    """cnnlab's MaxPool2d (strided maxima where windows tile the input) against torch's own:
    equal outputs and gradients, bit for bit; 'ties' has many equal values in a window, 'relu'
    whole windows of zeros, and the odd sizes leave rows and columns outside every window."""
    from cnnlab.model.build import MaxPool2d

    gen = torch.Generator().manual_seed(len(values) * 7 + (kernel if isinstance(kernel, int) else sum(kernel)))
    shape = (3, 4, 11, 10)
    x = {"ties": torch.randint(0, 3, shape, generator=gen).float(),
         "normal": torch.randn(shape, generator=gen),
         "relu": torch.randn(shape, generator=gen).relu()}[values]
    for layout in (torch.contiguous_format, torch.channels_last):
        ours, theirs = (x.clone().contiguous(memory_format=layout).requires_grad_(True) for _ in range(2))
        out = MaxPool2d(kernel)(ours)
        want = torch.nn.MaxPool2d(kernel)(theirs)
        grad = torch.randn(want.shape, generator=gen)
        out.backward(grad)
        want.backward(grad)
        assert torch.equal(out, want) and torch.equal(ours.grad, theirs.grad)
        with torch.no_grad():
            assert torch.equal(MaxPool2d(kernel)(x), want)


def test_max_pool_that_overlaps_or_pads_is_torch_own():
    from cnnlab.model.build import MaxPool2d

    x = torch.randn(2, 3, 9, 9, requires_grad=True)
    for module in (MaxPool2d(3, 2), MaxPool2d(2, 2, padding=1), MaxPool2d(2, ceil_mode=True)):
        reference = torch.nn.MaxPool2d(module.kernel_size, module.stride, module.padding,
                                       ceil_mode=module.ceil_mode)
        assert torch.equal(module(x), reference(x))


def test_exported_network_pools_with_torch_own_op():
    """The logged model (torch.export, pt2) holds aten.max_pool2d, not cnnlab's Python pooling."""
    net = build(analyse(parse_layers(["conv:2:3:same", "maxpool:2", "flatten", "dense:3"]), (1, 8, 8))).eval()
    x = torch.randn(2, 1, 8, 8)
    exported = torch.export.export(net, (x,))
    ops = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert "aten.max_pool2d.default" in ops
    assert torch.equal(exported.module()(x), net(x))
