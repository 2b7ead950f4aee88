"""The analysis of every token against counts made without cnnlab's own helpers.

30 seeded random stacks mix the chapter's tokens and the new ones (dwconv, sepconv, res with
every shortcut, gn, ln, gmp) on small inputs. For each, per layer:

* parameters: the analysis's trainable count equals the built modules' parameters (sum of
  numel), its non-trainable count their BatchNorm moving mean and variance;
* MACs: equal `torch.utils.flop_counter.FlopCounterMode`'s FLOPs / 2, per layer and in total.
  cnnlab's MACs are the multiply-accumulates of convolutions (grouped, depthwise, pointwise,
  residual and projection ones included) and dense layers; FlopCounterMode counts exactly the
  convolution and matmul (mm, addmm, bmm) FLOPs, 2 per multiply-accumulate;
* output shapes: equal a real forward pass's;
* receptive field: equals a gradient probe. Backpropagate from one output pixel of the last
  spatial layer to the input and take the extent of the non-zero gradient. float64, every
  weight positive and every activation positive (so nothing cancels and no ReLU is off),
  eval mode. Two stand-ins keep the probe about connectivity: max pools become average
  pools of the same geometry (a max routes its gradient to one pixel of the window), and
  GroupNorm/LayerNorm statistics are detached (they are taken over the whole map, which
  the receptive field, by its usual definition, leaves out; see cnnlab.model.shapes).
  The probe runs on an input large enough that the field is not clipped, for two adjacent
  output pixels per axis (size, jump and start: the field's exact position), and on the
  stack's own input, where the probed field must lie within the analysis's.
"""

from __future__ import annotations

import random
import re

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cnnlab.errors import ConfigError
from cnnlab.model.build import build
from cnnlab.model.shapes import analyse
from cnnlab.model.spec import LAYER_NAMES, parse_layers

STACKS = 30


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, min(n, 6) + 1) if n % d == 0]


def _candidate(rng: random.Random, channels: int) -> str:
    pad = rng.choice(["same", "valid"])
    k = rng.choice([str(rng.randint(1, 4)), f"{rng.randint(1, 4)}x{rng.randint(1, 4)}"])
    s = rng.choice(["", "", ":s2", ":s2x1", ":s1x2"])
    act = rng.choice(["", ":relu", ":tanh", ":nobias"])
    return rng.choice([
        f"conv:{rng.randint(1, 5)}:{k}{s}:{pad}{act}",
        f"dwconv:{k}{s}:{pad}{rng.choice(['', ':m2', ':m3'])}{act}",
        f"sepconv:{rng.randint(1, 5)}:{k}{s}:{pad}{rng.choice(['', ':m2'])}{act}",
        f"res:{rng.randint(max(channels - 1, 1), channels + 3)}{rng.choice(['', ':s2', ':s2x1'])}"
        f"{rng.choice(['', ':proj', ':pad'])}{rng.choice(['', ':nobn'])}{rng.choice(['', ':sigmoid', ':linear'])}",
        f"{rng.choice(['max', 'avg'])}pool:{rng.randint(1, 3)}{s}:{pad}",
        "bn", f"gn:{rng.choice(_divisors(channels))}", "ln", "dropout:0.3",
        rng.choice(["relu", "sigmoid", "tanh", "linear"]),
    ])


def _random_stack(seed: int) -> tuple[list[str], tuple[int, int, int]]:
    rng = random.Random(seed)
    shape = (rng.randint(1, 4), rng.randint(6, 14), rng.randint(6, 14))
    tokens: list[str] = []
    while len(tokens) < rng.randint(3, 7):
        channels = analyse(parse_layers(tokens), shape).output_shape[0] if tokens else shape[0]
        candidate = _candidate(rng, channels)
        try:  # keep only layers that fit; the analysis decides
            analyse(parse_layers(tokens + [candidate]), shape)
            tokens.append(candidate)
        except ConfigError:
            pass
    tokens.append(rng.choice(["flatten", "gap", "gmp"]))
    norm = rng.choice(["bn", "ln", "gn:1", "dropout:0.1"])
    if norm in ("ln", "gn:1") and analyse(parse_layers(tokens), shape).output_shape[0] < 2:
        norm = "bn"  # a norm over one feature normalises a single value: refused
    tokens += [norm, f"dense:{rng.randint(2, 6)}", rng.choice(["softmax", "relu"])]
    return tokens, shape


def _layer_index(child_name: str) -> int:
    """conv3 -> 3, conv3_relu -> 3, res12 -> 12 (build names modules <token name><index>)."""
    return int(re.match(r"\D+(\d+)", child_name).group(1))


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_random_stacks_cover_every_token():
    kinds = {t.split(":")[0] for seed in range(STACKS) for t in _random_stack(seed)[0]}
    assert kinds == set(LAYER_NAMES)
    shortcuts = {t.split(":", 2)[-1] for seed in range(STACKS) for t in _random_stack(seed)[0]
                 if t.startswith("res:")}
    assert any("pad" in s for s in shortcuts) and any("proj" in s for s in shortcuts)


@pytest.mark.parametrize("seed", range(STACKS))
def test_params_macs_and_shapes_equal_the_built_network(seed):
    tokens, shape = _random_stack(seed)
    analysis = analyse(parse_layers(tokens), shape)
    net = build(analysis, init="torch").eval()
    params: dict[int, int] = {}
    moving: dict[int, int] = {}
    seen: dict[int, tuple] = {}
    for name, child in net.named_children():
        index = _layer_index(name)
        params[index] = params.get(index, 0) + sum(p.numel() for p in child.parameters())
        moving[index] = moving.get(index, 0) + sum(
            b.numel() for n, b in child.named_buffers() if n.endswith(("running_mean", "running_var")))
        child.register_forward_hook(lambda m, i, o, index=index: seen.__setitem__(index, tuple(o.shape[1:])))
    with FlopCounterMode(display=False) as counter:
        out = net(torch.rand(1, *shape))  # one image: FLOPs scale with the batch
    flops = {_layer_index(key.split(".")[1]): 0 for key in counter.get_flop_counts() if key.count(".") == 1}
    for key, ops in counter.get_flop_counts().items():
        if key.count(".") == 1:  # "Sequential.res3": one layer's children summed by the counter
            flops[_layer_index(key.split(".")[1])] += sum(ops.values())
    for layer in analysis.layers:
        where = f"layer {layer.index} ({tokens[layer.index]}) of {tokens} on {shape}"
        assert layer.trainable == params[layer.index], where
        assert layer.non_trainable == moving[layer.index], where
        assert 2 * layer.macs == flops.get(layer.index, 0), where
        assert layer.output_shape == seen[layer.index], where
    assert counter.get_total_flops() == 2 * analysis.macs
    assert tuple(out.shape) == (1, *analysis.output_shape)


def _detached_statistics(module: nn.GroupNorm, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    """GroupNorm with its statistics held constant, scaled to stay positive after the affine."""
    x = inputs[0]
    groups = x.reshape(x.shape[0], module.num_groups, -1)
    mean = groups.mean(-1, keepdim=True).detach()
    std = (groups.var(-1, unbiased=False, keepdim=True) + module.eps).sqrt().detach()
    n = groups.shape[-1]  # |normalised| <= sqrt(n - 1): scaled into [-1, 1], then + bias (1.0)
    normalised = ((groups - mean) / (std * n**0.5)).reshape(x.shape)
    view = (1, -1) + (1,) * (x.dim() - 2)
    return normalised * module.weight.view(view) + module.bias.view(view)


def _probe_network(tokens: list[str], shape: tuple[int, int, int]) -> tuple[nn.Module, object]:
    """The spatial prefix, max pools as average pools, positive float64 weights, detached norms."""
    analysis = analyse(parse_layers(tokens), shape)
    net = build(analysis, init="torch").double().eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            # weights ~ U(0.1, 0.5) / fan-in keep activations O(1): no tanh or sigmoid saturates
            p.copy_(torch.rand(p.shape, generator=g, dtype=p.dtype) * 0.4 + 0.1)
            if p.dim() > 1:
                p.div_(p[0].numel())
        for m in net.modules():
            if isinstance(m, nn.GroupNorm):
                m.bias.fill_(1.0)
                m.register_forward_hook(_detached_statistics)
    return net, analysis


def _extent(grad: torch.Tensor) -> tuple[tuple[int, int], tuple[int, int]]:
    """(first, last) row and column with a non-zero gradient; grad is (C, H, W)."""
    hit = grad.abs().sum(0) > 0
    rows, cols = hit.any(1).nonzero().flatten(), hit.any(0).nonzero().flatten()
    return (rows.min().item(), rows.max().item()), (cols.min().item(), cols.max().item())


def _expected(rf, i: int, axis: int, n: int) -> tuple[int, int]:
    """Output pixel i's field along an axis, clipped to the n input pixels."""
    centre = rf.start[axis] + i * rf.jump[axis]
    first, last = centre - rf.size[axis] / 2, centre + rf.size[axis] / 2 - 1
    assert first == int(first), (rf, i)  # fields start on a pixel edge
    return max(int(first), 0), min(int(last), n - 1)


def _probe(tokens: list[str], shape: tuple[int, int, int], pixels: list[tuple[int, int]]):
    net, analysis = _probe_network(tokens, shape)
    x = (torch.rand(len(pixels), *shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
         + 0.5).requires_grad_()
    out = net(x)  # (P, C, H', W'); sample p probes pixels[p]
    assert (out > 0).all()  # every activation positive: no ReLU is off, nothing cancels
    sum(out[p, :, i, j].sum() for p, (i, j) in enumerate(pixels)).backward()
    return [_extent(x.grad[p]) for p in range(len(pixels))], analysis


@pytest.mark.parametrize("seed", range(STACKS))
def test_receptive_field_equals_a_gradient_probe(seed):
    tokens, shape = _random_stack(seed)
    analysis = analyse(parse_layers(tokens), shape)
    last = max(layer.index for layer in analysis.layers if layer.rf is not None)
    spatial = [re.sub(r"^maxpool", "avgpool", t) for t in tokens[:last + 1]]
    rf = analysis.receptive_field

    # On its own input: the centre output's field lies within the analysis's, clipped to the
    # image (not always all of it: a layer's padding, or the pixels a `valid` layer drops, can
    # cut a field short inside the network).
    oh, ow = analysis.layers[last].output_shape[1:]
    (rows, cols), = _probe(spatial, shape, [(oh // 2, ow // 2)])[0]
    (r0, r1), (c0, c1) = _expected(rf, oh // 2, 0, shape[1]), _expected(rf, ow // 2, 1, shape[2])
    assert r0 <= rows[0] <= rows[1] <= r1 and c0 <= cols[0] <= cols[1] <= c1

    # On an input large enough for the whole field, two neighbours per axis: size, jump, start.
    big = (shape[0], shape[1] + 3 * rf.size[0], shape[2] + 3 * rf.size[1])
    big_analysis = analyse(parse_layers(spatial), big)
    big_rf = big_analysis.receptive_field
    assert (big_rf.size, big_rf.jump) == (rf.size, rf.jump)  # they do not depend on the input size
    oh, ow = big_analysis.output_shape[1:]
    i, j = oh // 2, ow // 2
    extents, _ = _probe(spatial, big, [(i, j), (i + 1, j), (i, j + 1)])
    for (rows, cols), (pi, pj) in zip(extents, [(i, j), (i + 1, j), (i, j + 1)]):
        assert rows == _expected(big_rf, pi, 0, big[1]) and cols == _expected(big_rf, pj, 1, big[2])
        assert 0 < rows[0] and rows[1] < big[1] - 1 and 0 < cols[0] and cols[1] < big[2] - 1  # not clipped
        assert (rows[1] - rows[0] + 1, cols[1] - cols[0] + 1) == rf.size
    assert extents[1][0][0] - extents[0][0][0] == rf.jump[0]
    assert extents[2][1][0] - extents[0][1][0] == rf.jump[1]
