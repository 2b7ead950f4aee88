"""Parts of an epoch of the chapter's baseline, each old way vs new way, side by side in this process.

    pooling    forward + backward of the baseline's MaxPool2D(2, 2) on a (32, 6, 32, 32) batch:
               torch's nn.MaxPool2d vs cnnlab's (cnnlab.model.build.MaxPool2d: tiled maxima)
    step       one training step of the baseline at batch 32 (forward, loss, backward, fused
               Adam), the network with torch's pooling vs cnnlab's
    dropout    forward + backward of the baseline's two dropouts at batch 32 ((32, 6, 16, 16) and
               (32, 128)): torch's nn.Dropout vs cnnlab's (cnnlab.model.dropout: the same masks)
    adam step  the baseline's fused Adam step with Lightning's NVML-based CUDA check in the
               environment vs without it (cnnlab.training.trainer.cheap_cuda_probe)
    step 2     the training step with torch's dropout and the NVML check vs cnnlab's dropout without
    step 3     the training step with cnnlab's dropout, with the NVML check vs without (the check alone)
    eval pass  the baseline's forward over 10,000 images in inference mode, in batches of
               1000 (the old data.eval_batch_size) vs 250 (the new one)

Interleaved in rotating order, `--repeats` times; torch's default threads unless --threads.

    python benchmarks/step_parts.py [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import lightning  # noqa: F401  (sets PYTORCH_NVML_BASED_CUDA_CHECK=1, as in every training process)
import os

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cnnlab.config.compose import compose  # noqa: E402
from cnnlab.model.build import MaxPool2d, build  # noqa: E402
from cnnlab.model.dropout import Dropout  # noqa: E402
from cnnlab.model.plan import model_plan  # noqa: E402
from cnnlab.training.optim import make_optimizer  # noqa: E402


NVML = "PYTORCH_NVML_BASED_CUDA_CHECK"
LIGHTNINGS_NVML = os.environ.get(NVML)  # as `import lightning` left it


def network(torch_pool: bool, torch_dropout: bool = False) -> torch.nn.Sequential:
    torch.manual_seed(0)
    net = build(model_plan(compose([])).analysis, logits=True)
    if torch_pool:
        net.maxpool3 = torch.nn.MaxPool2d(2, 2)
    if torch_dropout:
        net.dropout4, net.dropout7 = torch.nn.Dropout(0.2), torch.nn.Dropout(0.2)
    assert isinstance(net.maxpool3, MaxPool2d) != torch_pool
    assert isinstance(net.dropout4, Dropout) != torch_dropout
    return net


def nvml_check(on: bool) -> None:
    """Lightning's variable in the environment (on) or not (cnnlab's cheap_cuda_probe, no device)."""
    if on and LIGHTNINGS_NVML is not None:
        os.environ[NVML] = LIGHTNINGS_NVML
    else:
        os.environ.pop(NVML, None)


def dropout(torch_dropout: bool, n: int = 300) -> float:
    """Microseconds per forward + backward of both dropouts."""
    layer = (torch.nn.Dropout if torch_dropout else Dropout)(0.2).train()
    gen = torch.Generator().manual_seed(0)
    maps = torch.randn(32, 6, 16, 16, generator=gen).requires_grad_(True)
    dense = torch.randn(32, 128, generator=gen).requires_grad_(True)
    for _ in range(20):
        layer(maps).sum().backward(), layer(dense).sum().backward()
    start = time.perf_counter()
    for _ in range(n):
        layer(maps).sum().backward(), layer(dense).sum().backward()
    return (time.perf_counter() - start) / n * 1e6


def adam_step(nvml: bool, n: int = 500) -> float:
    """Milliseconds per fused Adam step of the baseline's parameters."""
    net = network(False)
    optimizer = make_optimizer(net.parameters(), dict(compose([]).optim))
    for p in net.parameters():
        p.grad = torch.randn_like(p)
    nvml_check(nvml)
    try:
        for _ in range(20):
            optimizer.step()
        start = time.perf_counter()
        for _ in range(n):
            optimizer.step()
        return (time.perf_counter() - start) / n * 1e3
    finally:
        nvml_check(True)


def pooling(torch_pool: bool, n: int = 300) -> float:
    """Milliseconds per forward + backward."""
    pool = torch.nn.MaxPool2d(2, 2) if torch_pool else MaxPool2d(2, 2)
    x = torch.randn(32, 6, 32, 32, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    grad = torch.ones(32, 6, 16, 16)
    for _ in range(20):
        pool(x).backward(grad)
    start = time.perf_counter()
    for _ in range(n):
        pool(x).backward(grad)
    return (time.perf_counter() - start) / n * 1e3


def step(torch_pool: bool, n: int = 200, torch_dropout: bool = False, nvml: bool = False) -> float:
    """Milliseconds per training step."""
    nvml_check(nvml)
    try:
        return _step(network(torch_pool, torch_dropout), n)
    finally:
        nvml_check(True)


def _step(net: torch.nn.Module, n: int) -> float:
    optimizer = make_optimizer(net.parameters(), dict(compose([]).optim))
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(32, 3, 32, 32, generator=gen), torch.randint(0, 10, (32,), generator=gen)

    def once() -> None:
        loss = F.cross_entropy(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(20):
        once()
    start = time.perf_counter()
    for _ in range(n):
        once()
    return (time.perf_counter() - start) / n * 1e3


def eval_pass(batch: int) -> float:
    """Seconds for 10,000 images."""
    net = network(False).eval()
    x = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        net(x)
        start = time.perf_counter()
        for _ in range(10_000 // batch):
            net(x)
    return time.perf_counter() - start


CASES = {
    ("pooling", "torch nn.MaxPool2d", "ms"): lambda: pooling(True),
    ("pooling", "cnnlab MaxPool2d (tiled)", "ms"): lambda: pooling(False),
    ("step", "baseline, torch pooling", "ms"): lambda: step(True),
    ("step", "baseline, cnnlab pooling", "ms"): lambda: step(False),
    ("eval pass", "10,000 images, batch 1000", "s"): lambda: eval_pass(1000),
    ("eval pass", "10,000 images, batch 250", "s"): lambda: eval_pass(250),
    ("dropout", "torch nn.Dropout", "us"): lambda: dropout(True),
    ("dropout", "cnnlab Dropout (same masks)", "us"): lambda: dropout(False),
    ("adam step", "with Lightning's NVML check", "ms"): lambda: adam_step(True),
    ("adam step", "without (cheap_cuda_probe)", "ms"): lambda: adam_step(False),
    ("step 2", "torch dropout, NVML check", "ms"): lambda: step(False, torch_dropout=True, nvml=True),
    ("step 2", "cnnlab dropout, no NVML check", "ms"): lambda: step(False),
    ("step 3", "cnnlab dropout, NVML check", "ms"): lambda: step(False, nvml=True),
    ("step 3", "cnnlab dropout, no NVML check", "ms"): lambda: step(False),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results: dict[tuple[str, str, str], list[float]] = {case: [] for case in CASES}
    names = list(CASES)
    for repeat in range(args.repeats):
        shift = repeat % len(names)
        for case in names[shift:] + names[:shift]:
            results[case].append(CASES[case]())
        print(f"repeat {repeat + 1}/{args.repeats} done", flush=True)
    print(f"\n{args.repeats} repeats interleaved in rotating order, torch threads {torch.get_num_threads()}\n")
    print("| part | way | median | min-max | new / old |")
    print("|---|---|---|---|---|")
    for part in dict.fromkeys(p for p, _, _ in CASES):
        (old, new) = [case for case in CASES if case[0] == part]
        for case in (old, new):
            values = results[case]
            ratio = statistics.median(results[new]) / statistics.median(results[old])
            print(f"| {part} | {case[1]} | {statistics.median(values):.3f} {case[2]} "
                  f"| {min(values):.3f}-{max(values):.3f} | {'' if case == old else f'{ratio:.3f}'} |")


if __name__ == "__main__":
    main()
