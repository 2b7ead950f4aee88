"""Wall time of an 8-job sweep: Hydra's joblib launcher (2 workers) vs its basic (sequential) launcher.

Both sweeps run the chapter's baseline over 8 seeds on a CIFAR-10 subset,
side by side in this one run, alternating, `--repeats` times. Each sweep is
a fresh `cnnlab train -m` process, so both pay the same start-up. With
joblib, cnnlab gives each of the 2 jobs half the cores' threads.

    python benchmarks/sweep_parallel.py                 # 5,000 images, 1 epoch, 3 repeats
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ARCHIVE = REPO.parent / "shared" / "datasets" / "cifar10-jpg.tar.gz"


def sweep(args, runs: Path, launcher: list[str], cache: Path) -> float:
    command = [sys.executable, "-m", "cnnlab.cli", "train", "-m", "experiment=baseline",
               "seed=" + ",".join(str(s) for s in range(args.seeds)), f"paths.runs={runs}",
               f"paths.cache={cache}",
               f"data.archive={args.archive}", f"data.subset={args.subset}",
               f"trainer.max_epochs={args.epochs}", "trainer.accelerator=cpu",
               "trainer.enable_progress_bar=false", "tracking.log_model=false", *launcher]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"sweep failed:\n{done.stderr[-3000:]}")
    return elapsed


def slug(name: str) -> str:
    """A folder name with no ',' or spaces: Hydra would read a comma in an override as a sweep."""
    return "".join(c if c.isalnum() else "-" for c in name)


def warm_cache(archive: str, cache: Path) -> None:
    sys.path.insert(0, str(REPO))
    from omegaconf import OmegaConf

    from cnnlab.config.compose import compose
    from cnnlab.data.sources import load_dataset

    cfg = compose([f"data.archive={archive}"])
    load_dataset(OmegaConf.to_container(cfg.data, resolve=True), cache, 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--archive", default=str(ARCHIVE))
    parser.add_argument("--subset", type=int, default=5000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=8, help="jobs per sweep")
    args = parser.parse_args()
    if not Path(args.archive).is_file():
        sys.exit(f"error: no CIFAR-10 archive at {args.archive}; pass --archive FILE.tar.gz")
    launchers = {"basic (sequential)": [],
                 "joblib, 2 workers": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]}
    times: dict[str, list[float]] = {name: [] for name in launchers}
    with tempfile.TemporaryDirectory() as tmp:
        warm_cache(args.archive, Path(tmp) / "cache")  # decode once, before any timing
        # One untimed sweep per launcher: first imports compile .pyc files and fill the OS cache.
        warm = argparse.Namespace(**{**vars(args), "seeds": 2})
        for name, launcher in launchers.items():
            sweep(warm, Path(tmp) / f"warm-{slug(name)}", launcher, Path(tmp) / "cache")
        for repeat in range(args.repeats):
            for name, launcher in launchers.items():
                runs = Path(tmp) / f"{slug(name)}-{repeat}"  # a fresh store per sweep
                times[name].append(sweep(args, runs, launcher, Path(tmp) / "cache"))
                print(f"repeat {repeat + 1}/{args.repeats}: {name} {times[name][-1]:.1f} s", flush=True)
    sequential = statistics.median(times["basic (sequential)"])
    print(f"\n{args.seeds}-job sweep of the baseline, {args.subset} CIFAR-10 images, {args.epochs} epoch(s) per job, "
          f"{args.repeats} repeats, alternating\n")
    print("| launcher           | median wall s | min-max s   | ratio to sequential |")
    print("|--------------------|---------------|-------------|---------------------|")
    for name, values in times.items():
        print(f"| {name:<18} | {statistics.median(values):13.1f} | {min(values):.1f}-{max(values):.1f} "
              f"| {statistics.median(values) / sequential:19.3f} |")


if __name__ == "__main__":
    main()
