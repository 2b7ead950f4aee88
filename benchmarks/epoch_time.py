"""Seconds per epoch of the chapter's baseline: cnnlab (tracking on, off) vs a hand-written loop.

All three run in this one process, interleaved (A B C, B C A, C A B ...), on the same
data (CIFAR-10 copy, batch 32) and the same model, so the machine's noise
hits them alike. Each repeat trains `--epochs` epochs and keeps the last
epoch's time (the first pays one-off warm-up). An epoch is one pass over the
training set plus one evaluation pass over the test set, for all three.

    python benchmarks/epoch_time.py                     # full CIFAR-10 copy
    python benchmarks/epoch_time.py --subset 10000      # quicker

With a tensorflow-cpu venv at runs/tfvenv (see benchmarks/keras_baseline.py), the
chapter's own Keras program runs in the same interleaving, on the same pixels.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cnnlab.config.compose import compose  # noqa: E402
from cnnlab.data.batches import TensorBatches  # noqa: E402
from cnnlab.data.sources import load_dataset  # noqa: E402
from cnnlab.model.build import build  # noqa: E402
from cnnlab.model.plan import model_plan  # noqa: E402
from cnnlab.train import train  # noqa: E402
from cnnlab.training.allocator import in_effect, restart_with_settings  # noqa: E402
from cnnlab.training.artifacts import read_history  # noqa: E402
from cnnlab.training.optim import make_optimizer  # noqa: E402

ARCHIVE = REPO.parent / "shared" / "datasets" / "cifar10-jpg.tar.gz"
KERAS = "Keras (the chapter's program)"


def overrides(args, runs: Path, *extra: str) -> list[str]:
    return [f"paths.runs={runs}", f"data.archive={args.archive}", f"trainer.max_epochs={args.epochs}",
            "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "tracking.log_model=false",
            *([f"data.subset={args.subset}"] if args.subset else []), *extra]


def cnnlab_epoch(args, runs: Path, tracking: bool, repeat: int) -> tuple[float, float]:
    cfg = compose(overrides(args, runs, f"tracking.enabled={str(tracking).lower()}",
                            f"tracking.run_name=bench-{tracking}-{repeat}", f"seed={repeat}"))
    train(cfg)
    folder = runs / "outputs" / "cnnlab" / f"bench-{tracking}-{repeat}"
    last = read_history(folder / "history.jsonl")[-1]
    return last["seconds"], last["val/acc"]


def hand_loop_epoch(args, runs: Path, repeat: int) -> tuple[float, float]:
    """What a researcher would write by hand: same model, same batches, no framework."""
    cfg = compose(overrides(args, runs, f"seed={repeat}"))
    data = load_dataset(OmegaConf.to_container(cfg.data, resolve=True), runs / "cache", repeat)
    torch.manual_seed(repeat)
    net = build(model_plan(cfg).analysis, logits=True)
    optimizer = make_optimizer(net.parameters(), dict(cfg.optim))
    # Passes are numbered 0, 1, ... as they start: the same (seed, epoch) order as cnnlab's.
    batches = TensorBatches(data.train_x, data.train_y, 32, shuffle=True, seed=repeat)
    tests = TensorBatches(data.test_x, data.test_y, 1000)
    for _ in range(args.epochs):
        start = time.perf_counter()
        net.train()
        # The same bookkeeping cnnlab does: epoch loss and accuracy, kept on the device.
        loss_sum, correct = torch.zeros(()), torch.zeros((), dtype=torch.long)
        for x, y in batches:
            logits = net(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * len(y)
            correct += (logits.argmax(1) == y).sum()
        train_stats = (loss_sum.item(), correct.item())  # read once per epoch, like cnnlab's logs
        net.eval()
        val_loss, val_correct = 0.0, 0
        with torch.no_grad():
            for x, y in tests:
                logits = net(x)
                val_loss += F.cross_entropy(logits, y, reduction="sum").item()
                val_correct += (logits.argmax(1) == y).sum().item()
        seconds = time.perf_counter() - start
        assert train_stats[1] >= 0
    return seconds, val_correct / len(data.test_y)


def keras_epoch(args, npz: Path, repeat: int) -> tuple[float, float]:
    """The chapter's own Keras program (benchmarks/keras_baseline.py) in its tensorflow venv."""
    command = [args.keras_python, str(REPO / "benchmarks" / "keras_baseline.py"), str(npz),
               "--epochs", str(args.epochs), "--seed", str(repeat),
               *(["--subset", str(args.subset)] if args.subset else [])]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    last = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])
    return last["seconds"], last["val_accuracy"]


def main() -> None:
    # The glibc malloc settings `cnnlab train` runs with (cnnlab/training/allocator.py), for every
    # contender alike: the hand loop and Keras run in this process or inherit its environment.
    restart_with_settings([__file__, *sys.argv[1:]])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--archive", default=str(ARCHIVE))
    parser.add_argument("--subset", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keras-python", default=str(REPO / "runs" / "tfvenv" / "bin" / "python"),
                        help="a python with tensorflow-cpu 2.21 (see benchmarks/keras_baseline.py); "
                             "the Keras row is skipped when it does not exist")
    args = parser.parse_args()
    if not Path(args.archive).is_file():
        sys.exit(f"error: no CIFAR-10 archive at {args.archive}; pass --archive FILE.tar.gz")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("cnnlab").setLevel(logging.WARNING)
    keras = Path(args.keras_python).is_file()
    times: dict[str, list[float]] = {"cnnlab, tracking on": [], "cnnlab, tracking off": [],
                                     "hand-written loop": [], **({KERAS: []} if keras else {})}
    accuracy: dict[str, list[float]] = {name: [] for name in times}
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(tmp)
        npz = runs / "cifar10.npz"
        if keras:  # Keras trains on exactly cnnlab's decoded pixels
            subprocess.run([sys.executable, str(REPO / "benchmarks" / "export_npz.py"), str(npz)], check=True,
                           capture_output=True)
        for repeat in range(args.repeats):
            measures = {"cnnlab, tracking on": partial(cnnlab_epoch, args, runs, True, repeat),
                        "cnnlab, tracking off": partial(cnnlab_epoch, args, runs, False, repeat),
                        "hand-written loop": partial(hand_loop_epoch, args, runs, repeat)}
            if keras:
                measures[KERAS] = partial(keras_epoch, args, npz, repeat)
            # The order rotates each repeat, so no contender always runs first (right after
            # another process freed the cores) or last.
            names = list(measures)
            shift = repeat % len(names)
            for name in names[shift:] + names[:shift]:
                seconds, acc = measures[name]()
                times[name].append(seconds)
                accuracy[name].append(acc)
            print(f"repeat {repeat + 1}/{args.repeats}: " + ", ".join(
                f"{k} {v[-1]:.2f} s" for k, v in times.items()), flush=True)
    hand = statistics.median(times["hand-written loop"])
    on, off = statistics.median(times["cnnlab, tracking on"]), statistics.median(times["cnnlab, tracking off"])
    n = args.subset or 50_000
    print(f"\nbaseline, batch 32, {n} train + 10000 test images, torch threads {torch.get_num_threads()}, "
          f"last of {args.epochs} epochs per repeat, {args.repeats} repeats, interleaved in rotating order,\n"
          f"malloc: {in_effect()}\n")
    print(f"| {'what':<29} | median s/epoch | min-max s | ratio to hand loop | val acc (mean) |")
    print(f"|{'-' * 31}|----------------|-----------|--------------------|----------------|")
    for name, values in times.items():
        ratio = statistics.median(values) / hand
        print(f"| {name:<29} | {statistics.median(values):14.2f} | {min(values):.2f}-{max(values):.2f} "
              f"| {ratio:18.3f} | {statistics.mean(accuracy[name]):14.4f} |")
    print(f"\nframework overhead (cnnlab tracking off / hand loop): {off / hand:.3f}")
    print(f"tracking overhead (cnnlab tracking on / off):         {on / off:.3f}")
    if keras:
        print(f"cnnlab (tracking on) / Keras:                         "
              f"{on / statistics.median(times[KERAS]):.3f}")


if __name__ == "__main__":
    main()
