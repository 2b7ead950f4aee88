"""`cnnlab reproduce RUN_ID`: rebuild a run's exact config from MLflow, train it again, compare.

The logged `config.yaml` artifact is the resolved config, so nothing is looked
up from today's conf/ files. The new run is tagged `reproduces=<run id>`.
Under deterministic CPU settings the metrics must be identical; otherwise
they must agree within a stated tolerance. Differences in code version,
package versions or data fingerprint are warned about, since they explain
(or hide) a mismatch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from cnnlab.errors import ConfigError
from cnnlab.tracking.reader import Reader
from cnnlab.vocabulary import ALL_METRICS as COMPARED

# Tags whose difference would explain a mismatch.
CONTEXT = {"mlflow.source.git.commit": "code version (git commit)", "git.dirty": "uncommitted changes",
           "version.torch": "torch version", "version.lightning": "lightning version",
           "version.mlflow": "mlflow version", "version.python": "python version",
           "data.fingerprint": "data fingerprint", "device": "device"}


@dataclass
class Reproduction:
    original: str
    new: str
    tolerance: float
    verdicts: list[tuple[str, float, float, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        return all(v[3] == "identical" for v in self.verdicts)

    def text(self) -> str:
        lines = [f"reproduction of {self.original} as {self.new} (tolerance {self.tolerance:g})"]
        lines += [f"  {key:<13} {a:.6f} vs {b:.6f}  {verdict}" for key, a, b, verdict in self.verdicts]
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _original(reader: Reader, run_id: str):
    run = reader.run(run_id)
    if "config.yaml" not in reader.artifact_names(run_id):
        raise ConfigError(f"run {run_id} has no logged config (config.yaml artifact); only runs "
                          f"that finished under cnnlab train can be reproduced")
    return run


def _verdict(a: float, b: float, tolerance: float) -> str:
    if a == b or (math.isnan(a) and math.isnan(b)):
        return "identical"
    return "within tolerance" if abs(a - b) <= tolerance else "DIFFERS"


def reproduce(uri: str, run_id: str, runs: Path, overrides: list[str] | None = None,
              tolerance: float | None = None) -> Reproduction:
    """Train the run's config again (with optional overrides) and compare every metric."""
    from cnnlab.config.compose import config_hash
    from cnnlab.data.sources import user_cache_dir
    from cnnlab.training.run import train

    reader = Reader(uri)
    original = _original(reader, run_id)
    text = reader.read_text(run_id, "config.yaml")
    cfg = OmegaConf.create(text)
    name = original.data.tags.get("mlflow.runName", run_id)
    OmegaConf.set_struct(cfg, True)  # an override of a key the run did not have is an error
    cfg.merge_with(OmegaConf.from_dotlist([
        # This user's decode cache, not the one the logged config resolved to (another machine's).
        f"paths.runs={runs}", f"paths.cache={user_cache_dir()}", "ckpt_path=null",
        f"tracking.uri={uri}", *(overrides or [])]))
    # Named by the config it trains: the same reproduction again is found, not repeated.
    cfg.tracking.run_name = f"reproduce-{name}-{config_hash(cfg)[:8]}"
    train(cfg, tags={"reproduces": run_id})
    (new,) = reader.search([original.info.experiment_id], f"tags.reproduces = '{run_id}'",
                           order_by=["attributes.start_time DESC"], max_results=1)
    on_cpu = original.data.tags.get("device") == "cpu" == new.data.tags.get("device")
    if tolerance is None:
        tolerance = 0.0 if on_cpu else 0.01  # GPUs' kernels are not bitwise repeatable
    result = Reproduction(run_id, new.info.run_id, tolerance)
    for key in COMPARED:
        a = original.data.metrics.get(key, math.nan)
        b = new.data.metrics.get(key, math.nan)
        result.verdicts.append((key, a, b, _verdict(a, b, tolerance)))
    for tag, meaning in CONTEXT.items():
        a, b = original.data.tags.get(tag), new.data.tags.get(tag)
        if a != b:
            result.warnings.append(f"{meaning} differs: {a} (original) vs {b} (now)")
    return result
