"""glibc's malloc, told to keep the memory a training step frees, for the next step.

With glibc's defaults, each big tensor (activations, gradients, batches) is mapped
fresh and handed back to the kernel when freed, so the next step page-faults it in
again; the faults grow with every run a process trains (measured: 247k, 464k, 1.06M
minor faults for three identical runs, epochs 1.2 -> 1.7 s). A fixed 64 MB mmap
threshold and a 256 MB trim threshold keep that memory in the process: 251k, 105k,
68k faults and flat epochs (1.5, 1.3, 1.2 s). A sweep that trains its jobs one after
another in one process (Hydra's basic launcher, Optuna) gains most; a single run's
first epochs were within noise (BENCHMARKS.md). The same advice as PyTorch's CPU
tuning guide (a better allocator), without installing one.

glibc reads these settings only when a process starts, so `cnnlab train` (and the
other commands that train) start themselves again once with them set. Values the
user exported win; CNNLAB_MALLOC_TUNING=0 turns this off.
"""

from __future__ import annotations

import os
import sys

SETTINGS = {"MALLOC_MMAP_THRESHOLD_": str(64 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(256 * 2**20)}
SWITCH = "CNNLAB_MALLOC_TUNING"


def wanted() -> bool:
    """glibc (Linux) only, and not switched off."""
    return sys.platform.startswith("linux") and os.environ.get(SWITCH, "1") != "0"


def in_effect() -> str:
    """What this process runs with, for the run's tags."""
    if not any(name in os.environ for name in SETTINGS):
        return "glibc defaults"
    return " ".join(f"{name}={os.environ[name]}" for name in SETTINGS if name in os.environ)


def restart_with_settings(args: list[str]) -> None:
    """Replace this process by `python args...` with SETTINGS in its environment, unless
    they are there already (then return: the restarted process, or the user's own)."""
    if not wanted() or any(name in os.environ for name in SETTINGS):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *args], {**SETTINGS, **os.environ})
