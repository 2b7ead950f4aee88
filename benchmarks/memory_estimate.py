"""cnnlab's memory estimate (cnnlab.training.budget) against the memory a training step takes.

Each configuration runs in a process of its own: build the network, then two Adam steps on a
random batch on the CPU, one thread. Measured = the parameters' bytes + the growth of the peak
resident set (ru_maxrss) over the resident set before the first step (gradients, Adam's state,
activations, the backward pass's temporaries). The estimate should be above it, by a small factor.

    python benchmarks/memory_estimate.py
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = (["model.widths=[64]", "data.batch_size=512"], ["model=vgg", "data.batch_size=256"],
           ["model=resnet", "data.batch_size=256"], ["model=resnet", "model.depth=56", "data.batch_size=128"])

ONE = r"""
import resource, sys, psutil, torch
from cnnlab.config.compose import compose, container
from cnnlab.model.build import build
from cnnlab.model.plan import model_plan
from cnnlab.training.budget import estimate_memory
cfg = compose(sys.argv[1:])
plan = model_plan(cfg)
estimate = estimate_memory(plan, container(cfg.data), container(cfg.optim))
torch.set_num_threads(1)
network = build(plan.analysis, cfg.model.init, cfg.model.bn_momentum, cfg.model.bn_eps, logits=True)
optimizer = torch.optim.Adam(network.parameters())
x = torch.rand(cfg.data.batch_size, *cfg.data.shape)
y = torch.randint(0, cfg.data.num_classes, (cfg.data.batch_size,))
before = psutil.Process().memory_info().rss
for _ in range(2):
    torch.nn.functional.cross_entropy(network(x), y).backward()
    optimizer.step()
    optimizer.zero_grad()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
measured = peak - before + 4 * plan.analysis.trainable
print(estimate.model, measured)
"""


def main() -> None:
    from cnnlab.training.budget import human

    print("| config | estimate (weights + activations) | measured | estimate / measured |\n|---|---|---|---|")
    for args in CONFIGS:
        out = subprocess.run([sys.executable, "-c", ONE, *args], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
        estimate, measured = int(out[-2]), int(out[-1])
        print(f"| `{' '.join(args)}` | {human(estimate)} | {human(measured)} | {estimate / measured:.2f} |")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
