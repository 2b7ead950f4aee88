"""The Launcher class Hydra instantiates for `hydra/launcher=stacked` (Hydra takes launcher classes
only from the hydra_plugins package); the work is in cnnlab.training.stacked_launcher."""

from __future__ import annotations

from collections.abc import Sequence

from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class StackedLauncher(Launcher):
    def __init__(self, max_stack: int = 64, stack: str = "auto", memory_fraction: float = 0.8,
                 dropout_mode: str = "exact") -> None:
        self.settings = {"max_stack": max_stack, "stack": stack, "memory_fraction": memory_fraction,
                         "dropout_mode": dropout_mode}
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from cnnlab.training.stacked_launcher import launch

        return launch(self, job_overrides, initial_job_idx)
