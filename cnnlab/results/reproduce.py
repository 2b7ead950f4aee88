"""`cnnlab reproduce RUN_ID`: rebuild a run's exact config from MLflow, train it again, compare.

The logged `config.yaml` artifact is the resolved config, so nothing is looked up from
today's conf/ files. The new run is tagged `reproduces=<run id>` and is named after the
original and the config it trains, so the same reproduction again is found, not repeated, and
two originals never share one. Every final metric and every epoch of the per-epoch history
are compared. On the CPU under deterministic settings they must be identical; elsewhere they
must agree within a tolerance (below). A metric that one side lacks is a difference.
Differences in code version, package versions or data fingerprint are warned about, since
they explain (or hide) a mismatch.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from cnnlab.errors import ConfigError
from cnnlab.tracking.reader import Reader
from cnnlab.vocabulary import ALL_METRICS, EPOCH_METRICS, REPRODUCES_TAG, TORCH_THREADS_TAG, is_trained

# Tags whose difference would explain a mismatch.
CONTEXT = {"mlflow.source.git.commit": "code version (git commit)", "git.dirty": "uncommitted changes",
           "version.torch": "torch version", "version.lightning": "lightning version",
           "version.mlflow": "mlflow version", "version.python": "python version",
           "data.fingerprint": "data fingerprint", "device": "device", TORCH_THREADS_TAG: "torch threads"}
# Off the CPU (GPU kernels are not bitwise repeatable) and with no seed-to-seed spread known:
# a difference relative to the original's value, per kind of metric. A same-seed rerun differs
# by rounding only, far less than one seed from another (on the chapter's baseline, seeds
# differ by about 2% in accuracy and 3% in loss).
RELATIVE_TOLERANCE = {"acc": 0.01, "loss": 0.02}
# With the spread over seeds known (the original's variant has >= SEEDS_FOR_SPREAD seeds),
# a reproduction may differ by this many seed-to-seed standard deviations.
SPREAD_MULTIPLE = 0.5
SEEDS_FOR_SPREAD = 3


@dataclass
class Reproduction:
    original: str
    new: str
    tolerance: str                      # how the tolerances were chosen, in words
    verdicts: list[tuple[str, float, float, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        return all(v[3] == "identical" for v in self.verdicts)

    @property
    def differs(self) -> bool:
        return any(v[3].startswith("DIFFERS") for v in self.verdicts)

    def text(self) -> str:
        lines = [f"reproduction of {self.original} as {self.new} (tolerance: {self.tolerance})"]
        lines += [f"  {key:<24} {a:.6f} vs {b:.6f}  {verdict}" for key, a, b, verdict in self.verdicts]
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _original(reader: Reader, run_id: str):
    run = reader.run(run_id)
    if "config.yaml" not in reader.artifact_names(run_id):
        raise ConfigError(f"run {run_id} has no logged config (config.yaml artifact); only runs "
                          f"that finished under cnnlab train can be reproduced")
    return run


def verdict(a: float, b: float, tolerance: float) -> str:
    if math.isnan(a) and math.isnan(b):
        return "identical"
    if math.isnan(a) or math.isnan(b):
        return f"DIFFERS (missing in the {'original' if math.isnan(a) else 'reproduction'})"
    if a == b:
        return "identical"
    return "within tolerance" if abs(a - b) <= tolerance else "DIFFERS"


def _seed_values(reader: Reader, original) -> list[dict[str, float]]:
    """The metrics of the original's variant over its seeds: finished runs of its experiment with
    every trained param equal but the seed (reproductions left out)."""
    def trained(run) -> dict:
        return {k: v for k, v in run.data.params.items() if is_trained(k) and k != "seed"}

    own = trained(original)
    finished = reader.search([original.info.experiment_id], "attributes.status = 'FINISHED'")
    return [r.data.metrics for r in finished if REPRODUCES_TAG not in r.data.tags and trained(r) == own]


def tolerances(reader: Reader, original, on_cpu: bool, given: float | None) -> tuple[dict[str, float], str]:
    """Per metric: the given tolerance; 0 on the CPU; else SPREAD_MULTIPLE x the seed-to-seed std
    where known, else RELATIVE_TOLERANCE of the original's value."""
    if given is not None:
        return dict.fromkeys(ALL_METRICS, given), f"{given:g} (given)"
    if on_cpu:
        return dict.fromkeys(ALL_METRICS, 0.0), "0 (CPU, deterministic: identical expected)"
    seeds = _seed_values(reader, original)
    out, spread_used = {}, False
    for metric in ALL_METRICS:
        values = [m[metric] for m in seeds if metric in m]
        if len(values) >= SEEDS_FOR_SPREAD:
            out[metric], spread_used = SPREAD_MULTIPLE * statistics.stdev(values), True
        else:
            value = abs(original.data.metrics.get(metric, 0.0))
            out[metric] = RELATIVE_TOLERANCE["loss" if metric.endswith("loss") else "acc"] * value
    how = (f"{SPREAD_MULTIPLE:g} x the seed-to-seed std of the original's variant where known, else "
           if spread_used else "") + "relative: 1% of accuracies, 2% of losses"
    return out, how


def check_model_source(original, cfg) -> None:
    """A registered model is code outside cnnlab: its factory's source file must hash as it did when
    the original trained (tagged by cnnlab.training.run.source_tags), or the rerun trains another network."""
    from cnnlab.training.checks import checked
    from cnnlab.vocabulary import MODEL_SOURCE_HASH_TAG, MODEL_SOURCE_TAG

    then = original.data.tags.get(MODEL_SOURCE_HASH_TAG)
    if then is None:
        return
    plan, _ = checked(cfg)  # finds the factory (registered now?) and measures it; train() reuses this
    path, now = plan.source or ("(no registered factory)", "")
    if now != then:
        raise ConfigError(f"run {original.info.run_id} trained model {plan.name} from "
                          f"{original.data.tags.get(MODEL_SOURCE_TAG)} with sha256 {then[:16]}..., but its factory's "
                          f"source {path} now hashes {now[:16] or '(nothing)'}...: the code changed; restore that "
                          f"file (e.g. git checkout the original's commit) to reproduce the run")


def reproduce(uri: str, run_id: str, runs: Path, overrides: list[str] | None = None,
              tolerance: float | None = None) -> Reproduction:
    """Train the run's config again (with optional overrides) and compare every metric and epoch."""
    from cnnlab.config.compose import compose, config_hash
    from cnnlab.data.sources import user_cache_dir
    from cnnlab.training.naming import run_directory
    from cnnlab.training.resume import RUN_ID_FILE
    from cnnlab.training.run import train

    reader = Reader(uri)
    original = _original(reader, run_id)
    # Keys added to cnnlab since the run was logged (run.*, tracking.*: how a run is kept, not what is
    # trained) take today's defaults; the logged config wins wherever it has the key.
    cfg = OmegaConf.merge(OmegaConf.masked_copy(compose([]), ["run", "tracking"]),
                          OmegaConf.create(reader.read_text(run_id, "config.yaml")))
    OmegaConf.set_struct(cfg, True)  # an override of a key the run did not have is an error
    # The threads the original trained with, where the machine chose them (trainer.threads=null picks
    # fewer on a busy machine, cnnlab.training.cpu_share): on the CPU they change the rounding.
    threads = original.data.tags.get(TORCH_THREADS_TAG)
    same_threads = [f"trainer.threads={threads}"] if cfg.trainer.threads is None and threads else []
    cfg.merge_with(OmegaConf.from_dotlist([
        # This user's decode cache, not the one the logged config resolved to (another machine's).
        f"paths.runs={runs}", f"paths.cache={user_cache_dir()}", "ckpt_path=null",
        f"tracking.uri={uri}", *same_threads, *(overrides or [])]))
    # Named by the original and the config it trains: the same reproduction again is found, not
    # repeated, and another original (or other overrides) never finds this one.
    cfg.tracking.run_name = f"reproduce-{run_id[:12]}-{config_hash(cfg)[:8]}"
    check_model_source(original, cfg)
    train(cfg, tags={REPRODUCES_TAG: run_id})
    new = reader.run((run_directory(cfg, cfg.tracking.run_name) / RUN_ID_FILE).read_text().strip())
    # A stacked seed (cnnlab.training.stacked_run) trained with grouped kernels, which sum in another
    # order than the lone run that reproduces it: equal up to rounding, not bitwise, even on the CPU.
    on_cpu = (original.data.tags.get("device") == "cpu" == new.data.tags.get("device")
              and "stacked" not in original.data.tags)
    limits, how = tolerances(reader, original, on_cpu, tolerance)
    result = Reproduction(run_id, new.info.run_id, how)
    for key in ALL_METRICS:
        a, b = original.data.metrics.get(key, math.nan), new.data.metrics.get(key, math.nan)
        result.verdicts.append((key, a, b, verdict(a, b, limits[key])))
    for key in EPOCH_METRICS:  # every epoch, not only the last
        before, after = reader.metric_history(run_id, key), reader.metric_history(new.info.run_id, key)
        if len(before) != len(after):
            result.verdicts.append((f"{key} epochs", len(before), len(after), "DIFFERS (epoch count)"))
            continue
        worst = max(range(len(before)), key=lambda i: abs(before[i] - after[i]), default=None)
        if worst is not None:
            result.verdicts.append((f"{key} epoch {worst + 1}", before[worst], after[worst],
                                    verdict(before[worst], after[worst], limits[key])))
    for tag, meaning in CONTEXT.items():
        a, b = original.data.tags.get(tag), new.data.tags.get(tag)
        if a != b:
            result.warnings.append(f"{meaning} differs: {a} (original) vs {b} (now)")
    return result
