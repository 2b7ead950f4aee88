"""The text a run prints: one line per epoch, and the block it ends with (its best epoch, what the
tested weights scored, where to see it). Plain functions of history rows, without torch or Lightning."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

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


def best_epoch(rows: Sequence[Mapping], monitor: str, mode: str) -> Mapping:
    """The history row ModelCheckpoint kept as best: the first epoch with the best value (it saves
    only on a strict improvement, so a later tie does not replace it)."""
    scored = [row for row in rows if monitor in row]
    if not scored:
        raise ValueError(f"no epoch in the history has {monitor}")
    pick = min if mode == "min" else max
    return pick(scored, key=lambda row: row[monitor])  # min/max return the first of equals


def outcome_text(rows: Sequence[Mapping], monitor: str, mode: str, tested: str,
                 test_metrics: Mapping[str, float], dashboard: tuple[str | None, str] | None,
                 run_id: str | None) -> str:
    """`tested` is checkpoint.test: best (the checkpoint of the best epoch) or last (the weights
    after the last epoch trained); `dashboard` is (command or None, run URL), None without tracking."""
    best = best_epoch(rows, monitor, mode)
    last = rows[-1]
    val = "  ".join(f"{k} {v:.4f}" for k, v in best.items() if k.startswith("val/") and not k.endswith("_best"))
    epoch = best["epoch"] if tested == "best" else last["epoch"]
    scores = "  ".join(f"{k} {test_metrics[k]:.4f}" for k in TEST_METRICS)
    lines = [f"done after epoch {last['epoch']}",
             f"  best epoch {best['epoch']} by {monitor} ({mode}): {val}",
             f"  test (checkpoint.test={tested}, epoch {epoch}): {scores}"]
    if dashboard is None:
        lines.append("  tracking off: no MLflow run")
        return "\n".join(lines)
    command, url = dashboard
    if command:
        lines += [f"  MLflow run {run_id}; to see it, run", f"    {command}", "  and open", f"    {url}"]
    else:
        lines += [f"  MLflow run {run_id}, at", f"    {url}"]
    return "\n".join(lines)
