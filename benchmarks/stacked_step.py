"""Milliseconds per training step of S seeds: S lone networks vs one stacked network vs vmap.

The chapter's baseline (conv:6:5:same, bn, relu, maxpool:2:same, dropout:0.2, flatten,
dense:128:relu, dropout:0.2, dense:10:softmax on 3x32x32), batch 32 per copy, Adam
(fused, the project's default implementation). One step = forward, cross-entropy,
backward, optimizer step, for all S copies:

    lone        S build() networks with S optimizers, stepped one after another
    stacked     cnnlab.model.stacked.StackedNetwork, exact dropout (each copy's lone masks)
    stacked-cl  the same with channels-last maps (set_channels_last)
    fast-cl     stacked-cl with dropout_mode="fast" (one mask draw for the stack)
    guarded-cl  stacked-cl + CopyGuard (NaN masking and freezing of diverged copies)
    vmap        torch.func.vmap over torch.func.functional_call of one lone network, with the
                S copies' parameters and buffers stacked by torch.func.stack_module_state

Contenders run interleaved in rotating order, `--steps` timed steps per repeat after
warm-up; the table shows the median over repeats and the ratio to `lone` (below 1: faster).
Runs on CUDA when present, else the CPU with `--threads` threads. No assertions.

    python benchmarks/stacked_step.py --repeats 5 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cnnlab.model.shapes import analyse  # noqa: E402
from cnnlab.model.spec import parse_layers  # noqa: E402
from cnnlab.model.stacked import CopyGuard, StackedNetwork, lone_networks, stacked_loss  # noqa: E402

BASELINE = ["conv:6:5:same", "bn", "relu", "maxpool:2:same", "dropout:0.2", "flatten",
            "dense:128:relu", "dropout:0.2", "dense:10:softmax"]
CONTENDERS = ("lone", "stacked", "stacked-cl", "fast-cl", "guarded-cl", "vmap")


def adam(params) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=1e-3, eps=1e-7, fused=True)


def lone_step(analysis, seeds, device) -> Callable[[torch.Tensor, torch.Tensor], None]:
    networks = [n.to(device).train() for n in lone_networks(analysis, seeds)[0]]
    optimizers = [adam(n.parameters()) for n in networks]

    def step(x, y):  # x (S, B, C, H, W), y (S, B)
        for s, (net, opt) in enumerate(zip(networks, optimizers)):
            loss = F.cross_entropy(net(x[s]), y[s])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return step


def stacked_step(analysis, seeds, device, mode="exact", guarded=False, channels_last=False) -> Callable:
    net = StackedNetwork(analysis, seeds, dropout_mode=mode, channels_last=channels_last).to(device).train()
    opt = adam(net.parameters())
    guard = CopyGuard(net, opt) if guarded else None

    def step(x, y):
        loss, _ = stacked_loss(net(x), y, guard.alive if guard else None)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if guard:
            guard.mask_gradients()
        opt.step()
        if guard:
            guard.commit()
    return step


def vmap_step(analysis, seeds, device) -> Callable:
    networks = [n.to(device).train() for n in lone_networks(analysis, seeds)[0]]
    params, buffers = torch.func.stack_module_state(networks)  # leaves with requires_grad
    base = copy.deepcopy(networks[0]).to("meta")

    def one(p, b, x, y):
        return F.cross_entropy(torch.func.functional_call(base, (p, b), (x,)), y)

    losses = torch.func.vmap(one, in_dims=(0, 0, 0, 0), randomness="different")
    opt = adam(list(params.values()))

    def step(x, y):
        loss = losses(params, buffers, x, y).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def make(name: str, analysis, seeds, device) -> Callable:
    if name == "lone":
        return lone_step(analysis, seeds, device)
    if name == "vmap":
        return vmap_step(analysis, seeds, device)
    return stacked_step(analysis, seeds, device, mode="fast" if name == "fast-cl" else "exact",
                        guarded=name == "guarded-cl", channels_last=name.endswith("-cl"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stacks", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(args.threads)
    analysis = analyse(parse_layers(BASELINE), (3, 32, 32))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"baseline, batch {args.batch} per copy, fused Adam, torch {torch.__version__}, {where}; "
          f"{args.steps} steps x {args.repeats} repeats (interleaved), median ms per step of all S copies\n")
    print(f"{'S':>3} {'contender':10} {'ms/step':>9} {'min-max':>17} {'ms/copy':>8} {'ratio to lone':>14}")
    for stack in args.stacks:
        seeds = list(range(stack))
        g = torch.Generator().manual_seed(0)
        x = torch.randn(stack, args.batch, 3, 32, 32, generator=g).to(device)
        y = torch.randint(0, 10, (stack, args.batch), generator=g).to(device)
        steps, times = {}, {}
        for name in args.contenders:
            try:
                steps[name] = make(name, analysis, seeds, device)
                for _ in range(args.warmup):
                    steps[name](x, y)
                times[name] = []
            except Exception as error:  # report, e.g. an op vmap cannot batch, and go on
                print(f"{stack:3d} {name:10} failed: {type(error).__name__}: {str(error).splitlines()[0][:80]}")
                steps.pop(name, None)
        names = list(steps)
        for repeat in range(args.repeats):
            for name in names[repeat % len(names):] + names[:repeat % len(names)]:
                sync()
                started = time.perf_counter()
                for _ in range(args.steps):
                    steps[name](x, y)
                sync()
                times[name].append((time.perf_counter() - started) / args.steps * 1000)
        lone = statistics.median(times["lone"]) if "lone" in times else float("nan")
        for name in names:
            median = statistics.median(times[name])
            print(f"{stack:3d} {name:10} {median:9.2f} {min(times[name]):8.2f}-{max(times[name]):<8.2f} "
                  f"{median / stack:8.2f} {median / lone:14.2f}")


if __name__ == "__main__":
    main()
