"""Optimisers and learning-rate schedules by short name (`optim.name=adam`)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from cnnlab.errors import ConfigError

# torch is imported where optimisers are made: the trainer checks the config (check_optim_config)
# before anything heavy, so a typo costs milliseconds, not the seconds `import torch` takes.
if TYPE_CHECKING:
    import torch

OPTIMIZERS = ("adam", "adamw", "sgd")
# torch's three implementations of the same update: a Python loop over the tensors, one
# multi-tensor (foreach) kernel per operation, or one fused kernel for the whole step.
IMPLEMENTATIONS = ("loop", "foreach", "fused")
SCHEDULES = ("none", "step", "cosine", "onecycle")


def _number(cfg: Mapping, key: str, low: float, high: float = math.inf,
            low_open: bool = False) -> float:
    value = cfg.get(key)
    bad = isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value)
    if not bad:
        bad = value <= low if low_open else value < low
        bad = bad or value > high or math.isinf(value)
    if bad:
        # An open end at infinity: "(0, inf]" would read as if inf were allowed.
        close = ")" if math.isinf(high) else "]"
        raise ConfigError(f"optim.{key} must be a finite number in {'(' if low_open else '['}{low:g}, "
                          f"{high:g}{close}, got {value!r}")
    return float(value)


def check_optim_config(cfg: Mapping[str, Any]) -> None:
    """Every value checked before any work, with the allowed range in the message."""
    if cfg.get("name") not in OPTIMIZERS:
        raise ConfigError(f"optim.name must be one of {', '.join(OPTIMIZERS)}, got {cfg.get('name')!r}")
    if cfg.get("schedule") not in SCHEDULES:
        raise ConfigError(f"optim.schedule must be one of {', '.join(SCHEDULES)}, "
                          f"got {cfg.get('schedule')!r}")
    if cfg.get("impl") not in IMPLEMENTATIONS:
        raise ConfigError(f"optim.impl must be one of {', '.join(IMPLEMENTATIONS)}, got {cfg.get('impl')!r}")
    _number(cfg, "lr", 0.0, low_open=True)
    _number(cfg, "eps", 0.0, low_open=True)
    _number(cfg, "weight_decay", 0.0)
    _number(cfg, "momentum", 0.0, 1.0)
    _number(cfg, "gamma", 0.0, 1.0, low_open=True)
    _number(cfg, "label_smoothing", 0.0, 0.999)
    step = cfg.get("step_size")
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ConfigError(f"optim.step_size must be an integer >= 1 (epochs), got {step!r}")
    betas = cfg.get("betas")
    if not (isinstance(betas, (list, tuple)) and len(betas) == 2
            and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas)):
        raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {betas!r}")
    if not isinstance(cfg.get("nesterov"), bool):
        raise ConfigError(f"optim.nesterov must be true or false, got {cfg.get('nesterov')!r}")
    if cfg.get("nesterov") and cfg["name"] == "sgd" and cfg["momentum"] == 0:
        raise ConfigError("optim.nesterov=true needs optim.momentum > 0")


def make_optimizer(params: Iterable[torch.nn.Parameter], cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    import torch

    name = cfg["name"]
    impl = {"loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}[cfg["impl"]]
    if name == "sgd":
        return torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["momentum"],
                               nesterov=cfg["nesterov"], weight_decay=cfg["weight_decay"], **impl)
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[name]
    return cls(params, lr=cfg["lr"], betas=tuple(cfg["betas"]), eps=cfg["eps"],
               weight_decay=cfg["weight_decay"], **impl)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: Mapping[str, Any], max_epochs: int,
                   total_steps: int) -> dict | None:
    """A Lightning lr_scheduler config, or None."""
    import torch

    schedule = cfg["schedule"]
    if schedule == "none":
        return None
    if schedule == "step":
        sched = torch.optim.lr_scheduler.StepLR(optimizer, cfg["step_size"], cfg["gamma"])
        return {"scheduler": sched, "interval": "epoch"}
    if schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max_epochs)
        return {"scheduler": sched, "interval": "epoch"}
    sched = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg["lr"], total_steps=total_steps)
    return {"scheduler": sched, "interval": "step"}
