"""Whole training of S seeds of the chapter's baseline: one stacked job vs S lone runs, one after another.

Both train the same S seeds of the same config (the baseline, a `--subset` of the CIFAR-10 copy,
`--epochs` epochs, tracking off: the time is the training's, not MLflow's), in this process:

    stacked     cnnlab.training.stacked_run.train_stacked: the S seeds as one StackedNetwork
    sequential  cnnlab.train.train once per seed (Lightning, the lone path)

Interleaved: each repeat runs the two in rotating order, so the machine's noise hits both alike.
Printed per S: the median wall seconds over repeats, the time ratio stacked / sequential (below 1:
stacking is faster), seeds per second, and every run's final val/acc (= test/acc: the chapter
validates on the test set), which must agree between the two if each stacked seed is its lone run.

With `--sequential-max N`, sequential runs only for S <= N; above, its time is estimated as S x
the per-seed time at the largest S measured, and marked "est." (256 lone runs take long).

    python benchmarks/stacked_seeds.py                              # 4, 8, 16 seeds, 10,000 images, 2 epochs
    python benchmarks/stacked_seeds.py --seeds 2 --subset 500 --epochs 1 --repeats 1   # a smoke test
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cnnlab.config.compose import compose  # noqa: E402
from cnnlab.train import train  # noqa: E402
from cnnlab.training.artifacts import read_history  # noqa: E402
from cnnlab.training.stacked_run import SeedJob, lone_config, train_stacked  # noqa: E402

ARCHIVE = REPO.parent / "shared" / "datasets" / "cifar10-jpg.tar.gz"


def overrides(args, runs: Path) -> list[str]:
    return [f"paths.runs={runs}", f"data.archive={args.archive}", f"data.subset={args.subset}",
            f"trainer.max_epochs={args.epochs}", f"trainer.accelerator={args.accelerator}",
            "trainer.enable_progress_bar=false", "tracking.enabled=false", "model=baseline"]


def stacked(args, runs: Path, seeds: list[int]) -> tuple[float, list[float]]:
    jobs = [SeedJob(lone_config(compose([*overrides(args, runs), f"seed={s}"]), s), [f"seed={s}"],
                    runs / "stacked" / f"s{s}") for s in seeds]
    start = time.perf_counter()
    train_stacked(jobs, dropout_mode=args.dropout_mode)
    seconds = time.perf_counter() - start
    return seconds, [read_history(job.run_dir / "history.jsonl")[-1]["val/acc"] for job in jobs]


def sequential(args, runs: Path, seeds: list[int]) -> tuple[float, list[float]]:
    accuracies = []
    start = time.perf_counter()
    for s in seeds:
        train(compose([*overrides(args, runs), f"seed={s}", f"tracking.run_name=lone-s{s}"]))
        accuracies.append(read_history(runs / "outputs" / "cnnlab" / f"lone-s{s}" / "history.jsonl")[-1]["val/acc"])
    return time.perf_counter() - start, accuracies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[4, 8, 16], help="stack sizes S")
    parser.add_argument("--subset", type=int, default=10000, help="training images")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--archive", default=str(ARCHIVE))
    parser.add_argument("--accelerator", default="auto", help="trainer.accelerator for both")
    parser.add_argument("--dropout-mode", default="exact", choices=("exact", "fast"),
                        help="the stack's dropout: each seed's lone masks, or one draw (fast)")
    parser.add_argument("--sequential-max", type=int, default=None,
                        help="run sequential only up to this S; estimate it above")
    args = parser.parse_args()
    if not Path(args.archive).is_file():
        sys.exit(f"error: no CIFAR-10 archive at {args.archive}; pass --archive FILE.tar.gz")
    logging.getLogger("cnnlab").setLevel(logging.WARNING)  # one line per epoch per seed otherwise
    logging.getLogger("lightning").setLevel(logging.WARNING)
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}; baseline, "
          f"{args.subset} images, {args.epochs} epochs, {args.repeats} repeats, interleaved")
    # Warm-up outside the timings: the decode cache filled, imports and kernels loaded, so the first
    # contender timed does not pay them for both.
    with tempfile.TemporaryDirectory() as tmp:
        sequential(args, Path(tmp), [0])
        stacked(args, Path(tmp), [0])
    rows, per_seed = [], None
    for size in args.seeds:
        seeds = list(range(size))
        contenders = {"stacked": stacked}
        if args.sequential_max is None or size <= args.sequential_max:
            contenders["sequential"] = sequential
        times = {name: [] for name in contenders}
        accuracies = {}
        for repeat in range(args.repeats):
            names = list(contenders)
            names = names[repeat % len(names):] + names[:repeat % len(names)]  # rotating order
            for name in names:
                with tempfile.TemporaryDirectory(dir=REPO / "runs" if (REPO / "runs").is_dir() else None) as tmp:
                    seconds, acc = contenders[name](args, Path(tmp), seeds)
                times[name].append(seconds)
                accuracies[name] = acc
                print(f"  S={size} repeat {repeat + 1} {name}: {seconds:.1f} s", flush=True)
        stacked_s = statistics.median(times["stacked"])
        if "sequential" in times:
            sequential_s, estimated = statistics.median(times["sequential"]), ""
            per_seed = sequential_s / size
        else:
            sequential_s, estimated = per_seed * size, " est."
        rows.append((size, stacked_s, sequential_s, estimated))
        print(f"S={size}: stacked {stacked_s:.1f} s ({size / stacked_s:.2f} seeds/s), sequential "
              f"{sequential_s:.1f} s{estimated} ({size / sequential_s:.2f} seeds/s), ratio stacked/sequential "
              f"{stacked_s / sequential_s:.2f}{estimated}; repeats: stacked {[round(t, 1) for t in times['stacked']]}"
              f", sequential {[round(t, 1) for t in times.get('sequential', [])]}")
        for name, acc in accuracies.items():
            print(f"  {name} val/acc per seed: {' '.join(f'{a:.4f}' for a in acc)} "
                  f"(mean {statistics.fmean(acc):.4f})")
    print("\n| seeds | stacked s | seeds/s | sequential s | seeds/s | stacked/sequential |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for size, st, sq, est in rows:
        print(f"| {size} | {st:.1f} | {size / st:.2f} | {sq:.1f}{est} | {size / sq:.2f} | {st / sq:.2f}{est} |")


if __name__ == "__main__":
    main()
