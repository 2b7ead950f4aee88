"""The block a run ends with: its best epoch, what the tested weights scored, and where to see it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from cnnlab.vocabulary import TEST_METRICS


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
