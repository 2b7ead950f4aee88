"""Milliseconds per optimiser step, torch's three implementations side by side (optim.impl).

The chapter's baseline's parameters, gradients from one batch; each implementation steps
`--steps` times per repeat, interleaved in rotating order. Prints median and spread per
implementation and the ratio to the plain loop, for Adam, AdamW and SGD as configured in conf/optim/.

    python benchmarks/optimizer_step.py --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cnnlab.config.compose import compose  # noqa: E402
from cnnlab.config.schema import OPTIMIZER_IMPLEMENTATIONS as IMPLEMENTATIONS  # noqa: E402
from cnnlab.model.build import build  # noqa: E402
from cnnlab.model.plan import model_plan  # noqa: E402
from cnnlab.training.optim import make_optimizer  # noqa: E402


def step_ms(network: torch.nn.Module, optim: dict, impl: str, steps: int) -> float:
    optimizer = make_optimizer(network.parameters(), {**optim, "impl": impl})
    for _ in range(20):  # state allocated, caches warm
        optimizer.step()
    started = time.perf_counter()
    for _ in range(steps):
        optimizer.step()
    return (time.perf_counter() - started) / steps * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=1000)
    args = parser.parse_args()
    network = build(model_plan(compose([])).analysis, logits=True)
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    F.cross_entropy(network(x), y).backward()
    print(f"baseline ({sum(p.numel() for p in network.parameters()):,} parameters), torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, {args.steps} steps x {args.repeats} repeats\n")
    print(f"{'optimiser':10} {'impl':8} {'median ms/step':>15} {'min-max':>15} {'ratio to loop':>14}")
    for name in ("adam", "adamw", "sgd"):
        optim = dict(compose([f"optim={name}"]).optim)
        times: dict[str, list[float]] = {impl: [] for impl in IMPLEMENTATIONS}
        for repeat in range(args.repeats):
            order = IMPLEMENTATIONS[repeat % 3:] + IMPLEMENTATIONS[:repeat % 3]
            for impl in order:
                times[impl].append(step_ms(network, optim, impl, args.steps))
        loop = statistics.median(times["loop"])
        for impl, values in times.items():
            median = statistics.median(values)
            print(f"{name:10} {impl:8} {median:15.3f} {min(values):7.3f}-{max(values):<7.3f} {median / loop:14.3f}")


if __name__ == "__main__":
    main()
