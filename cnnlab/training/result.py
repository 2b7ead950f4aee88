"""What one training run gives back to its caller (`cnnlab.train`, the Hydra app, reproduce, audit).

Built from what the run leaves behind, so a run trained now and a finished run found again (the
same command run twice) give back the same thing: the epochs from its history.jsonl, the best
epoch of `checkpoint.monitor` among them, and the test metrics of the checkpoint it tested.
No torch, Lightning or MLflow here: `import cnnlab` stays cheap.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# metrics' keys besides the test metrics: the best monitored value is "best/<monitor>".
BEST = "best/"
BEST_EPOCH = "best/epoch"


@dataclass(frozen=True)
class Result:
    """One run's outcome.

    run_id: the MLflow run (None with tracking off); run_dir: its folder (checkpoints,
    history.jsonl, summary, weights, curves); history: one dict per epoch as in history.jsonl
    (`epoch` 1, 2, ... and the epoch metrics); metrics: `best/<checkpoint.monitor>` (its best
    value), `best/epoch` (the first epoch that reached it) and `test/loss`, `test/acc` (the
    checkpoint tested, per `checkpoint.test`); score: what the Hydra app returns to a sweeper
    (Optuna): the best value of `checkpoint.monitor`, as the best checkpoint recorded it.
    """

    run_id: str | None
    run_dir: Path
    history: list[dict[str, Any]] = field(repr=False)
    metrics: dict[str, float | int]
    score: float


def run_result(run_id: str | None, run_dir: Path, monitor: str, mode: str, score: float,
               tested: Mapping[str, float]) -> Result:
    """The Result of the run in `run_dir`, its history read back from history.jsonl."""
    from cnnlab.training.artifacts import read_history  # (imports torch: only once a run exists)

    history = read_history(run_dir / "history.jsonl")
    metrics: dict[str, float | int] = {}
    rows = [row for row in history if monitor in row]
    if rows:
        pick = min if mode == "min" else max  # the first of equal values: ModelCheckpoint keeps the first
        best = pick(rows, key=lambda row: row[monitor])
        metrics = {f"{BEST}{monitor}": best[monitor], BEST_EPOCH: best["epoch"]}
    metrics.update({key: float(value) for key, value in tested.items()})
    return Result(run_id, run_dir, history, metrics, float(score))
