"""Dropout on the CPU with torch's own masks, drawn faster.

On the CPU, nn.Dropout (ATen's `_dropout_impl`) computes `noise = empty_like(x);
noise.bernoulli_(1 - p); noise.div_(1 - p); x * noise`. Where torch's CPU bernoulli_ is its
default kernel (not MKL's, which torch uses on Intel CPUs), it draws one float64 uniform per
element from the generator, serially, and keeps the element when that uniform is below 1 - p:
`uniform_(dtype=float64) < 1 - p` draws the very same numbers in the same order, with a faster
kernel. The masks, the outputs, the gradients and the generator's state afterwards are torch's,
bit for bit, for a contiguous input (tests/test_dropout.py); a probe at first use checks this
torch on this CPU, and where they differ (MKL's stream) bernoulli_ itself is used. The baseline's
two dropouts take 0.68 of torch's time forward and backward, about 5% of a training step on the
CPU (benchmarks/step_parts.py, BENCHMARKS.md).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

_PROBE_SIZE = 4099  # more than one of MKL's parallel chunks (800), an odd length


@functools.cache
def uniform_draws_are_bernoullis() -> bool:
    """Whether float64 uniforms below `keep` give the CPU's bernoulli_(keep) mask here, bit for bit."""
    keep = 0.8
    draws = torch.Generator().manual_seed(12345)
    reference = torch.Generator().manual_seed(12345)
    ours = torch.empty(_PROBE_SIZE, dtype=torch.float64).uniform_(generator=draws) < keep
    theirs = torch.empty(_PROBE_SIZE).bernoulli_(keep, generator=reference)
    return torch.equal(ours.float(), theirs) and torch.equal(draws.get_state(), reference.get_state())


def bernoulli_noise(like: torch.Tensor, keep: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """`torch.empty(like.shape).bernoulli_(keep).div_(keep)`: dropout's noise for `like` (its shape,
    dtype and device; contiguous, so drawn in logical order), the same numbers (and the same generator
    state afterwards) by the faster draw where the probe allows. Made with empty_like, so that under
    torch.func.vmap the noise is batched like `like`, as torch's dropout noise is."""
    contiguous = torch.contiguous_format
    if like.device.type == "cpu" and uniform_draws_are_bernoullis():
        uniforms = torch.empty_like(like, dtype=torch.float64, memory_format=contiguous).uniform_(generator=generator)
        return (uniforms < keep).to(like.dtype).div_(keep)
    return torch.empty_like(like, memory_format=contiguous).bernoulli_(keep, generator=generator).div_(keep)


class Dropout(nn.Dropout):
    """nn.Dropout, with the CPU noise drawn by `bernoulli_noise` in the tensor's logical order.

    torch's own draws it in the input's memory order, so trainer.channels_last=true got other masks
    than the same seed without it; here the layout is only a speed switch, and a stacked copy
    (cnnlab.model.stacked, channels-last on the CPU) draws its lone run's masks in either layout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (not self.training or self.inplace or not 0 < self.p < 1 or x.device.type != "cpu"
                or not x.is_floating_point() or torch.compiler.is_compiling() or torch.compiler.is_exporting()):
            return super().forward(x)  # torch's own: CUDA's fused kernel, in-place, and compiled graphs
        return x * bernoulli_noise(x, 1.0 - self.p)
