"""cnnlab's Dropout draws torch's own dropout masks (cnnlab.model.dropout): the same outputs,
gradients and generator state as nn.Dropout, bit for bit, whichever way the noise is drawn."""

import pytest
import torch

from cnnlab.model import dropout
from cnnlab.model.dropout import Dropout, bernoulli_noise, uniform_draws_are_bernoullis

SHAPES = [(32, 6, 16, 16), (32, 128), (5, 3, 7)]


def _one_pass(module: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor, seed: int):
    torch.manual_seed(seed)
    x = x.clone().requires_grad_(True)
    out = module.train()(x)
    out.backward(grad)
    return out.detach(), x.grad, torch.get_rng_state()


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("p", [0.2, 0.5])
@pytest.mark.parametrize("shape", SHAPES)
def test_outputs_gradients_and_generator_state_are_torchs(shape, p, fast, monkeypatch):
    if fast and not uniform_draws_are_bernoullis():
        pytest.skip("this CPU's torch draws bernoulli_ another way (MKL): the fast draw is not used here")
    monkeypatch.setattr(dropout, "uniform_draws_are_bernoullis", lambda: fast)
    gen = torch.Generator().manual_seed(7)
    x, grad = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    ours = _one_pass(Dropout(p), x, grad, seed=3)
    theirs = _one_pass(torch.nn.Dropout(p), x, grad, seed=3)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
    dropped = (ours[0] == 0).float().mean().item()
    assert abs(dropped - p) < 0.2  # a mask was drawn (not the identity, not all zeros)


def test_a_channels_last_input_gets_the_masks_of_its_contiguous_twin():
    """The layout is a speed switch only: torch's nn.Dropout would draw the noise in memory order."""
    x, grad = torch.randn(8, 6, 5, 5), torch.randn(8, 6, 5, 5)
    channels_last = _one_pass(Dropout(0.3), x.contiguous(memory_format=torch.channels_last), grad, 11)
    contiguous = _one_pass(torch.nn.Dropout(0.3), x, grad, 11)
    for a, b in zip(channels_last, contiguous):
        assert torch.equal(a, b)


def test_noise_from_a_generator_is_bernoulli_from_that_generator():
    ours, theirs = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    noise = bernoulli_noise(torch.empty(4, 33), 0.75, generator=ours)
    assert torch.equal(noise, torch.empty(4, 33).bernoulli_(0.75, generator=theirs).div_(0.75))
    assert torch.equal(ours.get_state(), theirs.get_state())


def test_evaluation_and_zero_rate_are_the_identity():
    x = torch.randn(4, 10)
    assert torch.equal(Dropout(0.5).eval()(x), x)
    assert torch.equal(Dropout(0.0).train()(x), x)


def test_it_works_under_vmap_with_different_masks_per_copy():
    """torch.func.vmap over a network with this Dropout (benchmarks/stacked_step.py's vmap contender)."""
    x = torch.ones(3, 4, 50)
    out = torch.func.vmap(Dropout(0.5).train(), randomness="different")(x)
    assert out.shape == x.shape and set(out.unique().tolist()) <= {0.0, 2.0}
    assert not torch.equal(out[0], out[1])
