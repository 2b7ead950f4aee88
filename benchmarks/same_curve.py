"""Same seed, same curve: this checkout vs another (the code before a speed change).

Trains the chapter's baseline with both (`cnnlab train`, CIFAR-10 copy, tracking off, the
same seed), one after the other, and prints each epoch's metrics side by side with the
largest absolute difference. Speed switches must leave the training arithmetic as it was.

    git archive COMMIT | tar -x -C /tmp/before
    python benchmarks/same_curve.py /tmp/before [--subset 10000] [--epochs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ARCHIVE = REPO.parent / "shared" / "datasets" / "cifar10-jpg.tar.gz"


def history(code: Path, runs: Path, args) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(code), "CNNLAB_CONF": str(code / "conf")}
    command = [sys.executable, "-m", "cnnlab.cli", "train", f"paths.runs={runs}",
               f"paths.cache={runs / 'cache'}", f"data.archive={args.archive}", "tracking=none",
               f"trainer.max_epochs={args.epochs}", f"seed={args.seed}", "trainer.enable_progress_bar=false",
               *([f"data.subset={args.subset}"] if args.subset else [])]
    done = subprocess.run(command, env=env, cwd=code, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"error: cnnlab train in {code} exited {done.returncode}:\n{done.stderr[-3000:]}")
    (path,) = runs.glob("outputs/*/*/history.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("before", help="the other checkout")
    parser.add_argument("--archive", default=str(ARCHIVE))
    parser.add_argument("--subset", type=int, default=10000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        before = history(Path(args.before).resolve(), Path(tmp) / "before", args)
        after = history(REPO, Path(tmp) / "after", args)
    keys = [k for k in before[0] if k not in ("epoch", "seconds")]
    print(f"baseline, seed {args.seed}, {args.subset or 50000} training images, {args.epochs} epochs\n")
    print("| epoch | metric | before | after | after - before |")
    print("|---|---|---|---|---|")
    largest: dict[str, float] = {}
    for old, new in zip(before, after):
        for key in keys:
            diff = new[key] - old[key]
            largest[key] = max(largest.get(key, 0.0), abs(diff))
            print(f"| {old['epoch']} | {key} | {old[key]:.9g} | {new[key]:.9g} | {diff:.3g} |")
    print("\nlargest |after - before|: " + ", ".join(f"{k} {v:.3g}" for k, v in largest.items()))


if __name__ == "__main__":
    main()
