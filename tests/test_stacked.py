"""A stack of S copies trains exactly as S lone build() networks (cnnlab.model.stacked)."""

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cnnlab.model.build import build
from cnnlab.model.shapes import analyse
from cnnlab.model.spec import LAYER_NAMES, parse_layers
from cnnlab.model.stacked import (
    CopyGuard,
    StackedDropout,
    StackedNetwork,
    clip_copy_gradients_,
    clip_grad_norm_per_copy_,
    lone_networks,
    stacked_loss,
    stacked_memory_bytes,
    supports_stacking,
)

SEEDS = [3, 11, 42]
STEPS = 20
BATCH = 6

# Every layer kind. A: an even kernel with stride 2 and max/avg pooling that pad
# asymmetrically (TF puts the extra pixel bottom/right), conv valid, BN on maps and on
# features, dropout on maps and on features, flatten, a softmax head.
NET_A = (["conv:4:4:s2:same", "bn", "relu", "conv:5:3:valid:tanh", "maxpool:3:s2:same",
          "avgpool:2:s1:same", "dropout:0.3", "flatten", "dense:16:relu", "bn", "dropout:0.5",
          "dense:5:softmax"], (3, 15, 15))
# B: gap, symmetric and asymmetric 'same' at stride 1, valid pooling, a softmax over channels
# inside the network, sigmoid, linear, a bias-free layer, a separate softmax token at the end.
NET_B = (["conv:4:3:same:relu", "bn", "avgpool:2", "conv:6:2:same:nobias", "sigmoid",
          "conv:3:1:same:softmax", "maxpool:2", "gap", "dense:8", "tanh", "linear", "dropout:0.2",
          "dense:4", "softmax"], (2, 10, 10))
# C: the layers beyond the chapter. Residual blocks with each shortcut (identity, option A's
# zero pad at stride 2, a projection without BN, a projection where the shape is kept), a
# depthwise conv with a multiplier, a separable conv at stride 2 on an even size (TF's extra
# pixel), GroupNorm and LayerNorm on maps and on features, global max pooling.
NET_C = (["conv:4:3:same", "bn", "relu", "res:4", "res:6:s2:pad", "res:8:s2:proj:nobn:tanh",
          "dwconv:3:same:m2:relu", "gn:4", "sepconv:6:3:s2:same:m2", "ln", "res:6:proj", "gmp", "ln",
          "dense:8", "gn:2", "relu", "dense:4:softmax"], (3, 12, 12))
NETS = {"A": NET_A, "B": NET_B, "C": NET_C}
OPTIMIZERS = {
    "adam": lambda params: torch.optim.Adam(params, lr=1e-2, foreach=False),
    "sgd": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-3, foreach=False),
}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _analysis(net):
    tokens, shape = NETS[net]
    return analyse(parse_layers(tokens), shape)


def _data(analysis, classes, steps=STEPS, dtype=torch.float64):
    """Copy s's own batches: x (steps, S, B, C, H, W), y (steps, S, B)."""
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(steps, len(SEEDS), BATCH, *analysis.input_shape, generator=g, dtype=dtype)
    y = torch.randint(0, classes, (steps, len(SEEDS), BATCH), generator=g)
    return x, y


def _lone_run(analysis, seed, x, y, optimizer, steps=STEPS, clip=None, unclipped=None):
    """What train.py does for one seed: seed, build, then train from torch's global generator.
    clip=(value, algorithm): Lightning's clipping before each step (its Precision.clip_gradients:
    torch's clip_grad_norm_ or clip_grad_value_ over every parameter); `unclipped`, a list, gets the
    gradients' total norm (norm) or largest element (value) before it."""
    torch.manual_seed(seed)
    net = build(analysis, logits=True).double().train()
    opt = OPTIMIZERS[optimizer](net.parameters())
    losses = []
    for t in range(steps):
        loss = F.cross_entropy(net(x[t]), y[t])
        opt.zero_grad()
        loss.backward()
        if clip is not None:
            grads = [p.grad for p in net.parameters()]
            if clip[1] == "norm":
                unclipped.append(torch.nn.utils.get_total_norm(grads).item())
                torch.nn.utils.clip_grad_norm_(net.parameters(), clip[0])
            else:
                unclipped.append(max(g.abs().max().item() for g in grads))
                torch.nn.utils.clip_grad_value_(net.parameters(), clip[0])
        opt.step()
        losses.append(loss.item())
    return net, torch.tensor(losses, dtype=torch.float64)


def _stacked_run(analysis, x, y, optimizer, steps=STEPS, channels_last=False, sync=None, reload_guard_at=None,
                 clip=None):
    net = StackedNetwork(analysis, SEEDS, channels_last=channels_last).double().train()
    opt = OPTIMIZERS[optimizer](net.parameters())
    guard = CopyGuard(net, opt, sync=sync)
    losses, finite_grads = [], []
    for t in range(steps):
        if t == reload_guard_at:  # as on resuming: a new guard, its state loaded after the others'
            state = guard.state_dict()
            guard = CopyGuard(net, opt, sync=sync)
            guard.load_state_dict(state)
        loss, per_copy = stacked_loss(net(x[t]), y[t], guard.alive)
        opt.zero_grad()
        loss.backward()
        guard.mask_gradients()
        if clip is not None:
            clip_copy_gradients_(net, *clip)
        finite_grads.append(all(torch.isfinite(p.grad).all() for p in net.parameters()))
        opt.step()
        guard.commit()
        losses.append(per_copy)
    return net, opt, guard, torch.stack(losses), finite_grads  # losses (steps, S)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.mark.parametrize("net,optimizer,channels_last", [
    ("A", "adam", False), ("A", "sgd", False), ("B", "adam", False), ("B", "sgd", False), ("A", "adam", True),
    ("C", "adam", False), ("C", "sgd", False), ("C", "sgd", True)])
def test_stack_trains_as_the_lone_runs(net, optimizer, channels_last):
    analysis = _analysis(net)
    x, y = _data(analysis, analysis.output_shape[0])
    stacked, _, guard, losses, _ = _stacked_run(analysis, x, y, optimizer, channels_last=channels_last)
    assert guard.alive.all()
    for s, seed in enumerate(SEEDS):
        lone, lone_losses = _lone_run(analysis, seed, x[:, s], y[:, s], optimizer)
        rel = ((losses[:, s] - lone_losses).abs() / lone_losses.abs()).max().item()
        assert rel < 1e-5, f"copy {s}: losses differ by {rel:.2e} relative"
        # every parameter and the BatchNorm running statistics
        assert _max_diff(stacked.lone_state_dict(s), lone.state_dict()) < 1e-4
        # ... and the training really moved them
        assert _max_diff(stacked.lone_state_dict(s), build_seeded(analysis, seed).state_dict()) > 1e-3


def build_seeded(analysis, seed):
    torch.manual_seed(seed)
    return build(analysis, logits=True).double()


def test_copies_start_as_train_py_builds_them():
    analysis = _analysis("A")
    stacked = StackedNetwork(analysis, SEEDS)
    before = torch.get_rng_state()
    for s, seed in enumerate(SEEDS):
        L.seed_everything(seed, workers=True, verbose=False)  # train.py's order: seed, then build
        lone = build(analysis, logits=True)
        for key, value in lone.state_dict().items():
            assert torch.equal(stacked.lone_state_dict(s)[key], value), key
        # the state the lone run's dropout draws from
        assert torch.equal(stacked.generators.get_states("cpu")[s], torch.get_rng_state())
    torch.set_rng_state(before)


def test_lone_state_dict_loads_into_build_and_back():
    analysis = _analysis("A")
    x, y = _data(analysis, 5, steps=3)
    stacked, *_ = _stacked_run(analysis, x, y, "adam", steps=3)
    stacked.eval()
    logits = stacked(x[0])
    for s in range(len(SEEDS)):
        lone = build(analysis, logits=True).double()
        lone.load_state_dict(stacked.lone_state_dict(s), strict=True)
        assert torch.allclose(lone.eval()(x[0, s]), logits[s], rtol=0, atol=1e-12)
    # the inverse, and from_lone
    other = StackedNetwork(analysis, [0, 1, 2]).double()
    other.load_lone_state_dict(1, stacked.lone_state_dict(2))
    assert _max_diff(other.lone_state_dict(1), stacked.lone_state_dict(2)) == 0
    lones = [build(analysis, logits=True).double() for _ in SEEDS]
    for s, lone in enumerate(lones):
        lone.load_state_dict(stacked.lone_state_dict(s))
    again = StackedNetwork.from_lone(analysis, lones).double().eval()
    assert torch.equal(again(x[0]), logits)
    with pytest.raises(KeyError):
        other.load_lone_state_dict(0, {k: v for k, v in lones[0].state_dict().items() if "bn1" not in k})


def test_exact_dropout_masks_are_the_lone_masks_bitwise():
    analysis = _analysis("A")
    networks, states = lone_networks(analysis, SEEDS)
    stacked = StackedNetwork(analysis, SEEDS)
    for shape in [(7, len(SEEDS) * 5, 4, 3), (len(SEEDS), 7, 13)]:  # maps (B, S*C, H, W), flat (S, B, F)
        drop = StackedDropout(0.3, len(SEEDS), stacked.generators)
        x = torch.randn(shape)
        for _ in range(3):  # the generators advance as the lone global one does
            out = drop(x)
            parts = x.chunk(len(SEEDS), 1) if x.dim() == 4 else x.unbind(0)
            outs = out.chunk(len(SEEDS), 1) if x.dim() == 4 else out.unbind(0)
            for s, (part, got) in enumerate(zip(parts, outs)):
                torch.set_rng_state(states[s])
                want = nn.Dropout(0.3)(part.contiguous())
                states[s] = torch.get_rng_state()
                assert torch.equal(got, want)
    # the whole network, float32, train mode: the lone forward with the same global state
    x = torch.randn(len(SEEDS), 4, *analysis.input_shape)
    out = StackedNetwork(analysis, SEEDS).train()(x)  # fresh generators
    _, states = lone_networks(analysis, SEEDS)
    for s, net in enumerate(networks):
        torch.set_rng_state(states[s])
        want = net.train()(x[s])
        assert torch.allclose(out[s], want, rtol=1e-5, atol=1e-5)


def test_fast_dropout_draws_one_mask_per_stack():
    analysis = _analysis("A")
    stacked = StackedNetwork(analysis, [0, 0], dropout_mode="fast")
    drop = stacked.dropout6
    x = torch.ones(64, 2 * 5, 4, 4)
    out = drop(x)
    kept = (out != 0).double().mean().item()
    assert 0.6 < kept < 0.8  # p = 0.3
    a, b = out.chunk(2, 1)
    assert not torch.equal(a, b)  # same seed, different masks: not the lone draws
    assert torch.equal(drop.eval()(x), x)


@pytest.mark.parametrize("sync", [True, False])
@pytest.mark.parametrize("optimizer,clip", [(name, None) for name in sorted(OPTIMIZERS)] + [("adam", (0.05, "norm"))])
def test_a_nan_copy_is_masked_and_frozen_and_the_others_do_not_notice(optimizer, clip, sync):
    analysis = _analysis("A")
    x, y = _data(analysis, 5, steps=12)
    k, dead = 5, 1
    clean, _, _, clean_losses, _ = _stacked_run(analysis, x, y, optimizer, steps=12, sync=sync, clip=clip)
    x_bad = x.clone()
    x_bad[k, dead] = float("inf")
    stacked, opt, guard, losses, finite_grads = _stacked_run(analysis, x_bad, y, optimizer, steps=12, sync=sync,
                                                             reload_guard_at=k + 3, clip=clip)
    assert guard.alive.tolist() == [s != dead for s in range(len(SEEDS))]
    assert torch.isnan(losses[k, dead])
    assert all(finite_grads)  # the NaN never reaches the optimizer (nor a GradScaler's inf check)
    for s in range(len(SEEDS)):
        if s != dead:  # bitwise what they did without the NaN copy
            assert torch.equal(losses[:, s], clean_losses[:, s])
            for key, value in stacked.lone_state_dict(s).items():
                assert torch.equal(value, clean.lone_state_dict(s)[key]), key
    # The masked copy is frozen at its state before step k: bitwise the stack stopped after k
    # steps, and within the equivalence tolerance its lone run stopped there.
    def per_copy(state):
        return {key: v for key, v in state.items() if "num_batches" not in key}
    frozen = per_copy(stacked.lone_state_dict(dead))
    short, short_opt, *_ = _stacked_run(analysis, x, y, optimizer, steps=k, clip=clip)
    assert all(torch.equal(v, short.lone_state_dict(dead)[key]) for key, v in frozen.items())
    lone, _ = _lone_run(analysis, SEEDS[dead], x[:, dead], y[:, dead], optimizer, steps=k, clip=clip, unclipped=[])
    assert _max_diff(frozen, per_copy(lone.state_dict())) < 1e-4
    # ... and so is its optimizer state (Adam's moments, SGD's momentum buffer)
    for p, q in zip(stacked.parameters(), short.parameters()):
        for name, value in opt.state[p].items():
            if torch.is_tensor(value) and value.shape == p.shape:
                blocks = value.unflatten(0, (len(SEEDS), -1))
                assert torch.equal(blocks[dead], short_opt.state[q][name].unflatten(0, (len(SEEDS), -1))[dead])


@pytest.mark.parametrize("dtype,tol,channels_last", [(torch.float32, 1e-5, False), (torch.float32, 1e-5, True),
                                                     (torch.bfloat16, 3e-2, False)])
def test_low_precision_forward_matches_the_lone_forwards(dtype, tol, channels_last):
    for net in sorted(NETS):
        analysis = _analysis(net)
        networks, states = lone_networks(analysis, SEEDS)
        stacked = StackedNetwork(analysis, SEEDS, channels_last=channels_last).to(dtype).train()
        x = torch.randn(len(SEEDS), 8, *analysis.input_shape).to(dtype)
        out = stacked(x)
        assert out.dtype == dtype and out.shape == (len(SEEDS), 8, analysis.output_shape[0])
        for s, lone in enumerate(networks):
            torch.set_rng_state(states[s])
            want = lone.to(dtype).train()(x[s])
            scale = want.float().abs().max().item()
            assert (out[s].float() - want.float()).abs().max().item() <= tol * max(scale, 1.0), (net, s)


def _backward_stacked_and_lone(net):
    """One float64 batch through the stack of SEEDS and through each lone network: (stack, lones)
    with their gradients, the lone ones an independent computation of each copy's."""
    analysis = _analysis(net)
    lones, _ = lone_networks(analysis, SEEDS)
    lones = [lone.double().eval() for lone in lones]  # eval: no dropout draws to line up
    stacked = StackedNetwork.from_lone(analysis, lones).eval()
    x, y = _data(analysis, analysis.output_shape[0], steps=1)
    stacked_loss(stacked(x[0]), y[0])[0].backward()
    for s, lone in enumerate(lones):
        F.cross_entropy(lone(x[0, s]), y[0, s]).backward()
    return stacked, lones


def _grads(stacked, s):
    return {name: stacked.slot(name, p.grad, s) for name, p in stacked.named_parameters()}


@pytest.mark.parametrize("net", sorted(NETS))
def test_per_copy_clipping_by_norm_is_clip_grad_norm_of_each_lone_network(net):
    stacked, lones = _backward_stacked_and_lone(net)
    before = [torch.nn.utils.get_total_norm([p.grad for p in lone.parameters()]).item() for lone in lones]
    max_norm = sorted(before)[1]  # bites on the copies above it, leaves the smallest alone
    norms = clip_grad_norm_per_copy_(stacked, max_norm)
    assert norms.shape == (len(SEEDS),)
    assert norms.tolist() == pytest.approx(before, rel=1e-12)
    for s, lone in enumerate(lones):
        torch.nn.utils.clip_grad_norm_(lone.parameters(), max_norm)
        for name, p in lone.named_parameters():
            assert torch.allclose(_grads(stacked, s)[name], p.grad, rtol=1e-12, atol=1e-15), (s, name)
        after = torch.nn.utils.get_total_norm([p.grad for p in lone.parameters()]).item()
        assert after == pytest.approx(min(before[s], max_norm), rel=1e-5)  # clipped where it was above


def test_a_nan_copy_does_not_touch_the_other_copies_clipping():
    stacked, _ = _backward_stacked_and_lone("A")
    clean = StackedNetwork.from_lone(_analysis("A"), [build(_analysis("A"), logits=True).double()] * len(SEEDS))
    for p, q in zip(stacked.parameters(), clean.parameters()):
        q.grad = p.grad.clone()
    stacked.slot("dense8.weight", stacked.dense8.weight.grad, 1)[0, 0] = float("nan")  # copy 1 only
    norms, clean_norms = clip_grad_norm_per_copy_(stacked, 0.01), clip_grad_norm_per_copy_(clean, 0.01)
    assert torch.isnan(norms[1]) and torch.equal(norms[[0, 2]], clean_norms[[0, 2]])
    for s in (0, 2):  # bitwise as without the NaN
        assert all(torch.equal(g, _grads(clean, s)[name]) for name, g in _grads(stacked, s).items())
    assert all(torch.isnan(g).all() for g in _grads(stacked, 1).values())  # its own factor is NaN


@pytest.mark.parametrize("algorithm,clip_val,optimizer", [("norm", 0.05, "adam"), ("norm", 0.05, "sgd"),
                                                            ("value", 0.002, "adam"), ("value", 0.002, "sgd")])
def test_clipped_stack_trains_as_the_clipped_lone_runs(algorithm, clip_val, optimizer):
    """Float64, 10 steps, clipping on every step (unclipped norms 4-8, largest elements 0.8-1.3). Measured:
    losses 1e-12 (norm) and 1e-9 (value) relative apart with Adam (it magnifies rounding, see the module
    docstring), 1e-15 with SGD; weights 1e-11, 1e-9, 1e-16; the unclipped stack's weights 4e-2 to 1.2 away."""
    analysis = _analysis("A")
    x, y = _data(analysis, analysis.output_shape[0], steps=10)
    stacked, _, _, losses, _ = _stacked_run(analysis, x, y, optimizer, steps=10, clip=(clip_val, algorithm))
    unclipped_stack, _, _, unclipped_losses, _ = _stacked_run(analysis, x, y, optimizer, steps=10)
    for s, seed in enumerate(SEEDS):
        before = []
        lone, lone_losses = _lone_run(analysis, seed, x[:, s], y[:, s], optimizer, steps=10,
                                      clip=(clip_val, algorithm), unclipped=before)
        assert min(before) > clip_val, before  # it bites on every step
        rel = ((losses[:, s] - lone_losses).abs() / lone_losses.abs()).max().item()
        assert rel < 1e-5, f"copy {s}: losses differ by {rel:.2e} relative"
        assert _max_diff(stacked.lone_state_dict(s), lone.state_dict()) < 1e-4
        # ... and without clipping the stack would not have been the lone run
        assert _max_diff(unclipped_stack.lone_state_dict(s), lone.state_dict()) > 1e-3
        assert ((unclipped_losses[:, s] - lone_losses).abs() / lone_losses.abs()).max().item() > 1e-4


def test_clipping_zero_or_none_clips_nothing():
    stacked, _ = _backward_stacked_and_lone("B")
    grads = [p.grad.clone() for p in stacked.parameters()]
    for clip_val in (None, 0, 0.0):  # Lightning: clip_val <= 0 clips nothing
        clip_copy_gradients_(stacked, clip_val, "norm")
        assert all(torch.equal(p.grad, g) for p, g in zip(stacked.parameters(), grads))


def test_stacked_loss_gives_each_copy_its_lone_gradient():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 4, (3, 5), generator=g)
    total, per_copy = stacked_loss(logits, y, label_smoothing=0.1)
    total.backward()
    for s in range(3):
        lone = logits[s].detach().clone().requires_grad_()
        loss = F.cross_entropy(lone, y[s], label_smoothing=0.1)
        loss.backward()
        assert torch.allclose(per_copy[s], loss.detach(), rtol=1e-14, atol=0)
        assert torch.allclose(logits.grad[s], lone.grad, rtol=1e-14, atol=1e-16)
    assert not per_copy.requires_grad


def test_every_layer_kind_stacks_and_memory_scales():
    for net in NETS:
        ok, reason = supports_stacking(_analysis(net))
        assert ok, reason
    analysis = _analysis("A")
    kinds = {t.split(":")[0] for tokens, _ in NETS.values() for t in tokens}
    assert kinds == set(LAYER_NAMES)  # the tests cover every token
    one = stacked_memory_bytes(analysis, batch=32, stack=1)
    assert stacked_memory_bytes(analysis, batch=32, stack=8) == 8 * one
    params = analysis.trainable
    assert stacked_memory_bytes(analysis, 1, 1, optimizer="sgd", dtype_bytes=2) < one
    assert one > 4 * (4 * params + analysis.non_trainable)  # params, grads, 2 Adam tensors, BN stats
