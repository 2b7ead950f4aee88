"""Optimisers and learning-rate schedules by short name (`optim.name=adam`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

# torch is imported where optimisers are made: the trainer checks the config (cnnlab.config.schema)
# before anything heavy, so a typo costs milliseconds, not the seconds `import torch` takes.
if TYPE_CHECKING:
    import torch

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
