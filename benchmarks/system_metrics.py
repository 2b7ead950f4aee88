"""What tracking.system_metrics=true costs a tiny run: MLflow's SystemMetricsMonitor on vs off.

Each arm trains the same tiny synthetic run in this process (a new run every time), interleaved
off / on (MLflow's 10 s interval) / on with a 1 s interval, `--repeats` times; wall seconds and
this process's CPU seconds (the monitor's thread included) of the whole train() call.

    python benchmarks/system_metrics.py [--repeats 4] [--epochs 3]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cnnlab.config.compose import compose  # noqa: E402
from cnnlab.training.run import train  # noqa: E402

TINY = ["data=synthetic", "model.widths=[4]", "model.dense=[8]", "data.n_train=1024", "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false", "trainer.threads=1", "tracking.log_model=false"]
ARMS = {"off": ("false", None), "on (10 s)": ("true", None), "on (1 s)": ("true", "1")}


def one(runs: Path, arm: str, epochs: int, index: int) -> tuple[float, float]:
    flag, interval = ARMS[arm]
    if interval:
        os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = interval
    else:
        os.environ.pop("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", None)
    cfg = compose([*TINY, f"paths.runs={runs}", f"trainer.max_epochs={epochs}", f"tracking.system_metrics={flag}",
                   f"tracking.run_name={arm.split()[0]}-{index}-{interval}"])
    wall, cpu = time.perf_counter(), time.process_time()
    train(cfg)
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    logging.getLogger("cnnlab").setLevel(logging.WARNING)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(tmp)
        one(runs, "off", 1, -1)  # warm-up: imports, the store's creation
        times: dict[str, list[tuple[float, float]]] = {arm: [] for arm in ARMS}
        for index in range(args.repeats):
            for arm in ARMS:
                times[arm].append(one(runs, arm, args.epochs, index))
    print(f"tiny run, {args.epochs} epochs, {args.repeats} interleaved repeats: median (min-max)")
    base_wall = statistics.median(w for w, _ in times["off"])
    base_cpu = statistics.median(c for _, c in times["off"])
    for arm, values in times.items():
        walls, cpus = [w for w, _ in values], [c for _, c in values]
        print(f"  {arm:10s} wall {statistics.median(walls):6.2f} s ({min(walls):.2f}-{max(walls):.2f}), "
              f"{statistics.median(walls) - base_wall:+.2f} s;  cpu {statistics.median(cpus):6.2f} s "
              f"({min(cpus):.2f}-{max(cpus):.2f}), {statistics.median(cpus) - base_cpu:+.2f} s")


if __name__ == "__main__":
    main()
