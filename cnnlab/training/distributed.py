"""DDP: which rank this process is, and how Lightning's launcher starts the other ranks."""

from __future__ import annotations

from cnnlab.errors import ConfigError
from cnnlab.training.naming import in_multirun


def starts_ranks_by_command(strategy: str) -> bool:
    """DDP whose extra ranks Lightning starts by running this process's command again (its
    subprocess launcher), not by spawning or forking this process."""
    return strategy.startswith("ddp") and "spawn" not in strategy and "notebook" not in strategy


def prepare_strategy(strategy: str) -> None:
    """DDP starts one process per extra rank by running the command again: make that command
    `python -m cnnlab.train <the same overrides>`, and refuse it inside a multirun."""
    if not starts_ranks_by_command(strategy):
        return
    if in_multirun():
        raise ConfigError(f"trainer.strategy={strategy} cannot run inside a multirun: Lightning's DDP "
                          f"launcher would start the whole sweep again for each rank. Sweep "
                          f"single-process jobs (trainer.devices=1), or train each variant on its own")
    import importlib.util

    import __main__

    # Lightning's launcher runs `python -m <__main__'s module> <sys.argv[1:]>` for every extra
    # rank; under `cnnlab train` (a subcommand) that module is the one taking exactly these args.
    __main__.__spec__ = importlib.util.find_spec("cnnlab.train")


def process_rank() -> int:
    """This process's global rank: 0 unless Lightning's DDP launcher started it for another rank."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    return rank_zero_only.rank
