"""One epoch of the chapter's baseline on a quiet machine and next to one busy process, with the
thread settings side by side (issue #14, "a shared, busy machine").

Settings: `auto` (trainer.threads=null: cnnlab measures other processes' CPU use while the run
starts and takes the cores they leave free, cnnlab/training/cpu_share.py), `1` and `2`
(trainer.threads=1, 2; 2 was the default before, torch's one thread per core here), and `2p`:
2 threads with OMP_WAIT_POLICY=PASSIVE (idle OpenMP threads sleep rather than spin), which
tells whether spin-waiting or the barrier itself is the cause.
Conditions: alone, and next to one CPU-bound process (`while True: pass`) started 2 s before.
Every run is a fresh `cnnlab train` process (the automatic choice is made at start-up), with
tracking off; the figure is history.jsonl's seconds for the epoch (train + validation).
Settings rotate order in each repeat; the busy process runs only during the `busy` runs.

    python benchmarks/contention.py --subset 10000 --repeats 3

Goals: next to the busy process, auto within 1.3x of the best setting; alone, auto at most 3%
slower than the old default (2 threads).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ARCHIVE = REPO.parent / "shared" / "datasets" / "cifar10-jpg.tar.gz"
# name: (trainer.threads, extra environment). "2p" asks whether OpenMP's spin-waiting is the
# cause: the same 2 threads, with idle threads sleeping instead of spinning (OMP_WAIT_POLICY).
SETTINGS = {"auto": ("null", {}), "1": ("1", {}), "2": ("2", {}), "2p": ("2", {"OMP_WAIT_POLICY": "PASSIVE"})}


def epoch_seconds(args, runs: Path, setting: str, name: str) -> tuple[float, str]:
    runs = runs / name  # a store of its own (the decode cache is the user's, shared)
    argv = [sys.executable, "-m", "cnnlab.cli", "train", f"paths.runs={runs}", f"data.archive={args.archive}",
            f"data.subset={args.subset}", "trainer.max_epochs=1", "trainer.accelerator=cpu",
            "trainer.enable_progress_bar=false", "tracking.enabled=false",
            f"trainer.threads={SETTINGS[setting][0]}"]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env={**os.environ, **SETTINGS[setting][1]})
    if done.returncode != 0:
        raise SystemExit(f"cnnlab train failed ({done.returncode}): {done.stderr[-2000:]}")
    (history,) = runs.glob("outputs/*/*/history.jsonl")
    row = json.loads(history.read_text().splitlines()[-1])
    chose = "machine is busy" in done.stdout + done.stderr
    return row["seconds"], ("reduced" if chose else "default")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", default=str(ARCHIVE))
    parser.add_argument("--subset", type=int, default=10000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    seconds: dict[tuple[str, str], list[float]] = {}
    choices: dict[str, list[str]] = {"alone": [], "busy": []}
    order = list(SETTINGS)
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(tmp)
        # a warm-up run fills the decode cache, so no measured run decodes JPEGs
        epoch_seconds(args, runs, "2", "warm-up")
        for repeat in range(args.repeats):
            for condition in ("alone", "busy"):
                busy = None
                if condition == "busy":
                    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
                    time.sleep(2)
                try:
                    for setting in order:
                        s, chose = epoch_seconds(args, runs, setting, f"{condition}-{setting}-{repeat}")
                        seconds.setdefault((condition, setting), []).append(s)
                        if setting == "auto":
                            choices[condition].append(chose)
                        print(f"repeat {repeat + 1}, {condition:5}, threads {setting:4}: {s:6.2f} s", flush=True)
                finally:
                    if busy is not None:
                        busy.kill()
                        busy.wait()
            order = order[1:] + order[:1]

    print(f"\n{args.subset} CIFAR-10 images, 1 epoch (train + validation), {args.repeats} repeats each, "
          f"median seconds; ratio to the best setting of its condition")
    print(f"| condition | {' | '.join(f'threads={s}' for s in SETTINGS)} | auto chose |")
    print(f"| --- | {' | '.join('---' for _ in SETTINGS)} | --- |")
    for condition in ("alone", "busy"):
        medians = {s: statistics.median(seconds[(condition, s)]) for s in SETTINGS}
        best = min(medians.values())
        cells = " | ".join(f"{medians[s]:.2f} s ({medians[s] / best:.2f}x)" for s in SETTINGS)
        print(f"| {condition} | {cells} | {', '.join(choices[condition])} |")
    alone = {s: statistics.median(seconds[("alone", s)]) for s in SETTINGS}
    busy = {s: statistics.median(seconds[("busy", s)]) for s in SETTINGS}
    print(f"\nbusy: auto / best = {busy['auto'] / min(busy.values()):.2f} (goal <= 1.3); "
          f"alone: auto / old default (2 threads) = {alone['auto'] / alone['2']:.3f} (goal <= 1.03)")


if __name__ == "__main__":
    main()
