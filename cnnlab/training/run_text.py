"""The text a run prints: one line per epoch, and the block it ends with (its best epoch, what the
tested weights scored, where to see it). Plain functions of history rows, without torch or Lightning."""

from __future__ import annotations

from collections.abc import Mapping

from cnnlab.training.result import BEST_EPOCH, Result
from cnnlab.vocabulary import EPOCH_METRICS, TEST_METRICS


def epoch_line(row: Mapping, epochs: int) -> str:
    """One epoch (a history row) as one line that fits 80 columns:
    `epoch 2/5  train loss 1.2345 acc 0.5678  val loss 1.1234 acc 0.6012  41.3 s`.
    The stage is said once per group; val/acc_best is left out (the final block names the best epoch)."""
    stages: dict[str, list[str]] = {}
    for key in EPOCH_METRICS:
        stage, name = key.split("/")
        if key in row and not name.endswith("_best"):
            stages.setdefault(stage, []).append(f"{name} {row[key]:.4f}")
    groups = "  ".join(f"{stage} {' '.join(values)}" for stage, values in stages.items())
    return f"epoch {row['epoch']}/{epochs}  {groups}  {row['seconds']:.1f} s"


def outcome_text(result: Result, monitor: str, mode: str, tested: str,
                 dashboard: tuple[str | None, str] | None) -> str:
    """`tested` is checkpoint.test: best (the checkpoint of the best epoch) or last (the weights
    after the last epoch trained); `dashboard` is (command or None, the run's URL), None without tracking."""
    last = result.history[-1]
    lines = [f"done after epoch {last['epoch']}"]
    if BEST_EPOCH in result.metrics:
        best = next(row for row in result.history if row["epoch"] == result.metrics[BEST_EPOCH])
        val = "  ".join(f"{k} {v:.4f}" for k, v in best.items() if k.startswith("val/") and not k.endswith("_best"))
        lines.append(f"  best epoch {best['epoch']} by {monitor} ({mode}): {val}")
    else:  # (no epoch in history.jsonl has the monitored metric)
        lines.append(f"  no epoch has {monitor}")
    epoch = result.metrics.get(BEST_EPOCH, "?") if tested == "best" else last["epoch"]
    scores = "  ".join(f"{k} {result.metrics[k]:.4f}" for k in TEST_METRICS)
    lines.append(f"  test (checkpoint.test={tested}, epoch {epoch}): {scores}")
    if dashboard is None:
        lines.append("  tracking off: no MLflow run")
        return "\n".join(lines)
    command, url = dashboard
    if command:
        lines += [f"  MLflow run {result.run_id}; to see it, run", f"    {command}", "  and open", f"    {url}"]
    else:
        lines += [f"  MLflow run {result.run_id}, at", f"    {url}"]
    return "\n".join(lines)
