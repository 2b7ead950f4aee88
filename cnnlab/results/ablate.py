"""`cnnlab ablate EXPERIMENT`: run a preset's variants in rounds of seeds until every comparison
with the control is decided (better, worse, or equivalent within a margin), or the seed budget
is spent, with a family-wise error rate that holds however early it stops.

Method (cnnlab.results.sequential): for each variant against the control, an anytime-valid
confidence sequence for the mean paired difference of the compared metric, from the safe
t-test's e-process (Gaussian prior on the standardized effect, right-Haar prior on the scale:
Grünwald, de Heide & Koolen, "Safe testing"; Pérez-Ortiz et al. 2024), at alpha / k for k
comparisons (Bonferroni). Chosen over a group-sequential design because it needs no planned
number of looks and no known variance, and stays valid when a run is resumed or extended.

Each round is one Hydra multirun of the preset (`cnnlab train -m experiment=X seed=a,b,..`)
through the configured launcher, its jobs children of one parent run that records every
round. The settings and the looks taken are kept in `<paths.runs>/ablate/<key>/state.json`:
the same command, run again after a kill, resumes the parent, skips every finished seed (their
run folders are done) and replays the looks already taken, so no round is forgotten.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from cnnlab.config.compose import CONF_DIR, compose, slug
from cnnlab.errors import ConfigError, TrainingError
from cnnlab.results.sequential import DEFAULT_G, Ablation

log = logging.getLogger("cnnlab")
STATE_FILE = "state.json"
DECISION_TAG = "decision."  # decision.<variant as tag_name> = better | worse | equivalent | undecided


@dataclass(frozen=True)
class Settings:
    experiment: str
    overrides: tuple[str, ...] = ()
    max_seeds: int = 20
    margin: float = 0.005
    alpha: float = 0.05
    round_size: int = 2
    g: float = DEFAULT_G

    def check(self) -> None:
        """Every setting before any training: one line naming the value and what is allowed."""
        if isinstance(self.max_seeds, bool) or not isinstance(self.max_seeds, int) or self.max_seeds < 2:
            raise ConfigError(f"--max-seeds must be an integer >= 2 (a paired interval needs 2 seeds), "
                              f"got {self.max_seeds!r}")
        if not self.margin > 0:
            raise ConfigError(f"--margin must be a number > 0 (the difference too small to matter, in the "
                              f"metric's units), got {self.margin!r}")
        if not 0 < self.alpha < 0.5:
            raise ConfigError(f"--alpha must be a number in (0, 0.5) (the family-wise error rate), got {self.alpha!r}")
        if isinstance(self.round_size, bool) or not isinstance(self.round_size, int) or self.round_size < 1:
            raise ConfigError(f"--round must be an integer >= 1 (seeds per round), got {self.round_size!r}")

    def key(self) -> str:
        """What identifies an ablation: changing any of it voids the guarantee, so it is another one."""
        text = json.dumps([self.experiment, sorted(self.overrides), self.max_seeds, self.margin, self.alpha,
                           self.round_size, self.g])
        return f"{slug(self.experiment)}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


@dataclass
class Plan:
    """The preset's sweep: the variant grid (key -> 'a,b'), the fixed overrides, the control."""

    experiment_name: str
    grid: dict[str, str]
    fixed: list[str]
    control: str | None
    runs: Path
    uri: str


@dataclass
class Outcome:
    parent: str
    seeds: int
    states: dict[str, str]
    looks: list[dict] = field(default_factory=list)
    error_rate: str = ""
    metric: str = ""
    reference: str = ""

    def text(self) -> str:
        lines = [f"ablation {self.parent}: {self.seeds} seeds per variant, {self.metric} against {self.reference}"]
        last = self.looks[-1]["comparisons"] if self.looks else {}
        for variant, state in self.states.items():
            look = last.get(variant)
            interval = f" [{look['low']:+.4f}, {look['high']:+.4f}]" if look else ""
            lines.append(f"  {variant}: {state}{interval}")
        lines.append(f"method: {self.error_rate}")
        return "\n".join(lines)


def presets() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


def plan(settings: Settings) -> Plan:
    """Read the preset's sweep and check the whole config, before any run exists."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from cnnlab.tracking.store import tracking_uri
    from cnnlab.training.checks import check_writable, checked

    settings.check()
    if settings.experiment not in presets():
        raise ConfigError(f"no experiment preset '{settings.experiment}'; presets: {', '.join(presets())}")
    preset = OmegaConf.load(CONF_DIR / "experiment" / f"{settings.experiment}.yaml")
    params = OmegaConf.to_container(OmegaConf.select(preset, "hydra.sweeper.params") or OmegaConf.create({}))
    grid = {str(k): str(v) for k, v in params.items() if k != "seed"}
    fixed = []
    for override in OverridesParser.create().parse_overrides(list(settings.overrides)):
        key = override.get_key_element()
        if key == "seed":
            raise ConfigError("ablate chooses the seeds itself (0, 1, 2, ... in rounds); remove the seed override")
        if override.is_sweep_override():  # the user's own grid replaces the preset's for that key
            grid[key] = override.input_line.split("=", 1)[1]
        else:
            fixed.append(override.input_line)
    if not grid:
        raise ConfigError(f"preset '{settings.experiment}' sweeps no variants (only seeds); ablate compares "
                          f"variants: give a grid such as model.kernels=[5],[3,3]")
    first = [f"{k}={_first_value(k, v)}" for k, v in grid.items()]
    cfg = compose([f"experiment={settings.experiment}", *fixed, *first])
    checked(cfg)
    runs = Path(cfg.paths.runs).resolve()
    check_writable(runs, "paths.runs")
    if not cfg.tracking.enabled:
        raise ConfigError("ablate reads every round's results from MLflow; remove tracking=none")
    return Plan(str(cfg.tracking.experiment), grid, fixed, cfg.ablation.control, runs,
                tracking_uri(cfg.tracking.uri, runs))


def _first_value(key: str, values: str) -> str:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    (override,) = OverridesParser.create().parse_overrides([f"{key}={values}"])
    return next(iter(override.sweep_string_iterator())) if override.is_sweep_override() else values


def _open_parent(settings: Settings, plan: Plan, state: dict) -> str:
    from cnnlab.tracking.provenance import provenance_tags
    from cnnlab.tracking.store import artifact_location, check_tracking
    from cnnlab.tracking.writer import Tracker

    check_tracking(plan.uri, 5.0)
    tracker = Tracker(plan.uri, plan.runs)
    if state.get("parent") and tracker.resume(state["parent"]):
        log.info("ablation continues its MLflow parent run %s (%d looks taken)", state["parent"],
                 len(state.get("looks", [])))
        return state["parent"]
    keys = [*plan.grid, "seed"]
    tracker.start(plan.experiment_name, f"ablate {settings.experiment} " + " ".join(
        f"{k}={v}" for k, v in plan.grid.items()), artifact_location=artifact_location(
        plan.uri, plan.runs, plan.experiment_name), tags={
        **provenance_tags(), "sweep": "parent", "ablate": "parent", "sweep.keys": ",".join(keys),
        "ablation.control": plan.control or ""})
    tracker.log_params({"ablate.max_seeds": settings.max_seeds, "ablate.margin": settings.margin,
                        "ablate.alpha": settings.alpha, "ablate.round": settings.round_size,
                        "ablate.g": settings.g, "ablate.overrides": " ".join(settings.overrides) or "(none)",
                        "ablation.control": plan.control or "", "sweep.overrides": " ".join(plan.fixed),
                        **{f"sweep.grid.{k}": v for k, v in plan.grid.items()}})
    return tracker.run_id


def _round(settings: Settings, plan: Plan, parent: str, seeds: list[int]) -> None:
    """One Hydra multirun of every variant at these seeds, through the configured launcher."""
    command = [sys.executable, "-m", "cnnlab.cli", "train", "-m", f"experiment={settings.experiment}",
               *plan.fixed, *(f"{k}={v}" for k, v in plan.grid.items()),
               f"seed={','.join(str(s) for s in seeds)}", f"tracking.parent={parent}"]
    log.info("round: seeds %s: %s", ", ".join(map(str, seeds)), " ".join(command[3:]))
    finished = subprocess.run(command, env=os.environ.copy())
    if finished.returncode != 0:
        raise TrainingError(f"the round with seeds {seeds[0]}..{seeds[-1]} stopped with status "
                            f"{finished.returncode}; its output is above. Run the same ablate command "
                            f"again to resume it")


def _differences(uri: str, parent: str, control: str | None):
    """The comparison of the parent's runs, and per variant its paired differences from the reference."""
    from cnnlab.results.compare import compare
    from cnnlab.results.runs import replicates

    result = compare(uri, parent=parent, reference=control)
    values, _ = replicates(result.runs, result.metric)
    reference = values.get(result.reference, {})
    diffs = {}
    for variant in result.order:
        if variant == result.reference:
            continue
        mine = values.get(variant, {})
        shared = sorted(s for s in mine if s in reference)
        diffs[variant] = [mine[s] - reference[s] for s in shared]
    return result, diffs


def ablate(settings: Settings) -> Outcome:
    """Run rounds until every comparison is decided or max_seeds seeds per variant have run."""
    from cnnlab.tracking.writer import Tracker

    the_plan = plan(settings)
    folder = the_plan.runs / "ablate" / settings.key()
    folder.mkdir(parents=True, exist_ok=True)
    state_path = folder / STATE_FILE
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    parent = _open_parent(settings, the_plan, state)
    state.update({"parent": parent, "settings": settings.__dict__ | {"overrides": list(settings.overrides)}})
    _write(state_path, state)
    tracker = Tracker(the_plan.uri, the_plan.runs)
    tracker.run_id = parent
    ablation: Ablation | None = None
    seeds_done = 0
    result = None
    try:
        while True:
            looks = state.get("looks", [])
            if looks:  # resumed: rebuild from the stored looks before deciding what comes next
                result, diffs = _differences(the_plan.uri, parent, the_plan.control)
                ablation = Ablation.replay(diffs, {c: [look["comparisons"][c]["seeds"] for look in looks
                                                       if c in look["comparisons"]] for c in diffs},
                                           settings.alpha, settings.margin, settings.g)
                seeds_done = looks[-1]["seeds"]
            if (ablation and ablation.done) or seeds_done >= settings.max_seeds:
                break
            seeds = list(range(seeds_done, min(seeds_done + settings.round_size, settings.max_seeds)))
            _round(settings, the_plan, parent, seeds)
            seeds_done = seeds[-1] + 1
            result, diffs = _differences(the_plan.uri, parent, the_plan.control)
            if any(len(d) < 2 for d in diffs.values()):
                log.info("after %d seeds: not every comparison has 2 paired seeds yet; no look", seeds_done)
                if seeds_done >= settings.max_seeds:
                    break
                continue
            ablation = ablation or Ablation(list(diffs), settings.alpha, settings.margin, settings.g)
            taken = ablation.update(diffs)
            look = {"seeds": seeds_done, "comparisons": {
                c: {"seeds": len(diffs[c]), "mean": x.mean, "low": x.low, "high": x.high, "state": x.state}
                for c, x in taken.items()}}
            state["looks"] = [*state.get("looks", []), look]
            _write(state_path, state)
            _record(tracker, look)
            log.info("after %d seeds: %s", seeds_done, "; ".join(
                f"{c}: {x['state']} [{x['low']:+.4f}, {x['high']:+.4f}]" for c, x in look["comparisons"].items()))
    except BaseException:
        tracker.finish("KILLED")  # the same command resumes it
        raise
    states = ablation.states if ablation else {}
    if result is not None:
        states = {v: states.get(v, "undecided") for v in result.order if v != result.reference}
    text = ablation.error_rate_text() if ablation else Ablation(["x"], settings.alpha, settings.margin,
                                                                 settings.g).error_rate_text()
    tracker.set_tags({**{f"{DECISION_TAG}{tag_name(v)}": s for v, s in states.items()},
                      "ablation.decisions": json.dumps(states), "ablation.error_rate": text,
                      "ablation.seeds": seeds_done, "ablation.metric": result.metric if result else "",
                      "ablation.reference": result.reference if result else ""})
    tracker.log_text(json.dumps(state, indent=1), "ablate/state.json")
    tracker.finish("FINISHED")
    return Outcome(parent, seeds_done, states, state.get("looks", []), text,
                   result.metric if result else "", result.reference if result else "")


def tag_name(variant: str) -> str:
    """A variant in MLflow's key alphabet, still readable: 'kernels=[3, 3]' -> 'kernels:3 3'."""
    text = variant.replace("=", ":").translate(str.maketrans("", "", "[]()'\"")).replace(",", " ")
    return re.sub(r"[^A-Za-z0-9_.:/ -]", "_", " ".join(text.split()))[:200]


def _record(tracker, look: dict) -> None:
    """Each look on the parent run: its interval and state per comparison, at step = seeds so far."""
    metrics = {}
    for variant, x in look["comparisons"].items():
        name = tag_name(variant)
        metrics.update({f"ablate/{name}/mean": x["mean"], f"ablate/{name}/low": x["low"],
                        f"ablate/{name}/high": x["high"]})
    finite = {k: v for k, v in metrics.items() if v == v and abs(v) != float("inf")}
    tracker.log_metrics(finite, step=look["seeds"])
    tracker.set_tags({**{f"{DECISION_TAG}{tag_name(v)}": x["state"] for v, x in look["comparisons"].items()},
                      "ablation.decisions": json.dumps({v: x["state"] for v, x in look["comparisons"].items()})})


def _write(path: Path, state: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, path)
