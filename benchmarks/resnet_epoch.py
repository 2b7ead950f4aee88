"""Seconds per epoch of ResNet-20 (model=resnet, He et al. 2016's CIFAR net) on the CIFAR-10 copy:
cnnlab (tracking on, off) against a hand-written PyTorch loop with the same network, optimizer,
batch size and batches.

As benchmarks/epoch_time.py (whose helpers this reuses): all contenders run in this one process,
interleaved in rotating order (A B C, B C A, C A B ...), each repeat trains `--epochs` epochs and
keeps the last epoch's time (the first pays one-off warm-up); an epoch is one pass over the
training set plus one evaluation pass over the test set. The network is cnnlab's own plan
(`model_plan(cfg).build()`), the optimizer `make_optimizer` on the same optim config: what
differs is only the framework around the loop.

    python benchmarks/resnet_epoch.py                       # full copy, 3 repeats (long on a CPU)
    python benchmarks/resnet_epoch.py --repeats 5 --subset 10000
    python benchmarks/resnet_epoch.py --subset 300 --test-subset 200 --repeats 1 --epochs 1   # a smoke check

Defaults follow the paper's training setup where cnnlab has it: SGD, momentum 0.9, weight decay
1e-4, lr 0.1, batch 128 (no augmentation, so the hand loop needs none either).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import statistics
import sys
import tempfile
from functools import partial
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))

from epoch_time import ARCHIVE, REPO, hand_epochs, machine, one_round  # noqa: E402

from cnnlab.config.compose import compose  # noqa: E402
from cnnlab.data import sources  # noqa: E402
from cnnlab.data.batches import TensorBatches  # noqa: E402
from cnnlab.model.plan import model_plan  # noqa: E402
from cnnlab.train import train  # noqa: E402
from cnnlab.training.allocator import in_effect, restart_with_settings  # noqa: E402
from cnnlab.training.artifacts import read_history  # noqa: E402
from cnnlab.training.optim import make_optimizer  # noqa: E402

assert REPO.is_dir()


def overrides(args, runs: Path, *extra: str) -> list[str]:
    return [f"paths.runs={runs}", f"data.archive={args.archive}", f"trainer.max_epochs={args.epochs}",
            "model=resnet", f"model.depth={args.depth}", "optim=sgd", f"optim.lr={args.lr}",
            "optim.momentum=0.9", "optim.weight_decay=1e-4", f"data.batch_size={args.batch_size}",
            "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "tracking.log_model=false",
            # The same torch threads for every contender (left to itself, cnnlab picks the cores other
            # processes leave free, and a thread count set by one run would carry over to the next).
            f"trainer.threads={args.threads}", *([f"data.subset={args.subset}"] if args.subset else []), *extra]


def limit_test_images(count: int) -> None:
    """--test-subset (smoke checks only; cnnlab has no key for it): every load_dataset call, cnnlab's
    (run.py imports it from cnnlab.data.sources when a run starts) and the hand loop's, keeps only the
    first `count` test images."""
    load = sources.load_dataset

    def limited(*args, **kwargs):
        data = load(*args, **kwargs)
        return dataclasses.replace(data, test_x=data.test_x[:count], test_y=data.test_y[:count])

    sources.load_dataset = limited


def cnnlab_epoch(args, runs: Path, tracking: bool, repeat: int) -> tuple[float, float]:
    name = f"resnet-bench-{tracking}-{repeat}"
    cfg = compose(overrides(args, runs, f"tracking.enabled={str(tracking).lower()}",
                            f"tracking.run_name={name}", f"seed={repeat}"))
    train(cfg)
    last = read_history(runs / "outputs" / "cnnlab" / name / "history.jsonl")[-1]
    return last["seconds"], last["val/acc"]


def hand_loop_epoch(args, runs: Path, repeat: int) -> tuple[float, float]:
    """What a researcher would write by hand: the same ResNet-20, the same SGD, the same batches."""
    cfg = compose(overrides(args, runs, f"seed={repeat}"))
    data = sources.load_dataset(OmegaConf.to_container(cfg.data, resolve=True), Path(cfg.paths.cache), repeat)
    torch.set_num_threads(args.threads)
    torch.manual_seed(repeat)
    net = model_plan(cfg).build()
    optimizer = make_optimizer(net.parameters(), dict(cfg.optim))
    batches = TensorBatches(data.train_x, data.train_y, args.batch_size, shuffle=True, seed=repeat)
    tests = TensorBatches(data.test_x, data.test_y, cfg.data.eval_batch_size)
    return hand_epochs(net, optimizer, batches, tests, args.epochs)


def main() -> None:
    restart_with_settings([__file__, *sys.argv[1:]])  # cnnlab train's malloc settings, for all alike
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--archive", default=str(ARCHIVE))
    parser.add_argument("--subset", type=int, default=None, help="only the first N training images")
    parser.add_argument("--test-subset", type=int, default=None, help="only the first N test images")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads, for all alike")
    args = parser.parse_args()
    if not Path(args.archive).is_file():
        sys.exit(f"error: no CIFAR-10 archive at {args.archive}; pass --archive FILE.tar.gz")
    if args.test_subset:
        limit_test_images(args.test_subset)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("cnnlab").setLevel(logging.WARNING)
    print(machine() + "\n", flush=True)
    names = ["cnnlab, tracking on", "cnnlab, tracking off", "hand-written loop"]
    times: dict[str, list[float]] = {name: [] for name in names}
    accuracy: dict[str, list[float]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(tmp)
        for repeat in range(args.repeats):
            measures = {"cnnlab, tracking on": partial(cnnlab_epoch, args, runs, True, repeat),
                        "cnnlab, tracking off": partial(cnnlab_epoch, args, runs, False, repeat),
                        "hand-written loop": partial(hand_loop_epoch, args, runs, repeat)}
            one_round(measures, repeat, args.repeats, times, accuracy)
    hand = statistics.median(times["hand-written loop"])
    n = args.subset or 50_000
    print(f"\nResNet-{args.depth}, SGD lr {args.lr:g}, batch {args.batch_size}, {n} train + "
          f"{args.test_subset or 10_000} test images, torch threads {torch.get_num_threads()}, last of "
          f"{args.epochs} epochs per repeat, {args.repeats} repeats, interleaved in rotating order,\n"
          f"malloc: {in_effect()}\n")
    print(f"| {'what':<21} | median s/epoch | min-max s | ratio to hand loop | val acc (mean) | repeats (s) |")
    print(f"|{'-' * 23}|----------------|-----------|--------------------|----------------|-------------|")
    for name, values in times.items():
        print(f"| {name:<21} | {statistics.median(values):14.2f} | {min(values):.2f}-{max(values):.2f} "
              f"| {statistics.median(values) / hand:18.3f} | {statistics.mean(accuracy[name]):14.4f} "
              f"| {', '.join(f'{v:.2f}' for v in values)} |")
    off = statistics.median(times["cnnlab, tracking off"])
    print(f"\nframework overhead (cnnlab tracking off / hand loop): {off / hand:.3f} (goal <= 1.05)")


if __name__ == "__main__":
    main()
