"""Provenance: the code version, environment and host a run's numbers came from."""

from __future__ import annotations

import getpass
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cnnlab.tracking.writer import Tracker


def _git(*args: str) -> str | None:
    result = subprocess.run(["git", *args], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent)
    return result.stdout.strip() if result.returncode == 0 else None


def provenance_tags() -> dict[str, str]:
    """Code version, environment and host: what a reader needs to trust a number."""
    import lightning
    import mlflow
    import torch

    import cnnlab
    from cnnlab.training.allocator import in_effect

    commit = _git("rev-parse", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "mlflow.source.git.commit": commit or "unknown (not a git checkout)",
        "git.dirty": "unknown" if dirty is None else str(bool(dirty)).lower(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "version.cnnlab": cnnlab.__version__,
        "version.torch": torch.__version__,
        "version.lightning": lightning.__version__,
        "version.mlflow": mlflow.__version__,
        "version.python": platform.python_version(),
        "host": socket.gethostname(),
        "mlflow.user": getpass.getuser(),
        "malloc": in_effect(),  # changes speed, not numbers
    }


def log_provenance(tracker: Tracker) -> None:
    """What a reader needs to rebuild the code and environment: the uncommitted diff, if any,
    and every installed package's version."""
    from importlib.metadata import distributions

    packages = sorted({f"{d.metadata['Name']}=={d.version}" for d in distributions()
                       if d.metadata["Name"]}, key=str.lower)
    tracker.log_text("\n".join(packages) + "\n", "provenance/requirements.txt")
    diff = _git("diff", "HEAD")
    if diff:
        tracker.log_text(diff + "\n", "provenance/git.diff")
