"""Provenance: the code version, environment and host a run's numbers came from."""

from __future__ import annotations

import getpass
import hashlib
import os
import platform
import shlex
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from cnnlab.vocabulary import MODEL_SOURCE_HASH_TAG

if TYPE_CHECKING:
    from cnnlab.tracking.writer import Tracker


# Settings git would otherwise take from the job's environment or the repository's config and that
# make it run a program: an fsmonitor daemon (`git status` starts it) and hooks; `git diff` also
# gets --no-ext-diff --no-textconv. Hydra's hydra.job.env_set once set GIT_CONFIG_* for the job, and
# cnnlab's own `git status` ran the command it named (cnnlab.training.checks now refuses that too).
# No safe.directory: the checkout is the user's own, and trusting a repository owned by someone
# else would apply that repository's config (filters) to these calls.
_GIT_SAFE = ("-c", "core.fsmonitor=false", "-c", "core.hooksPath=/dev/null")


def git_environment() -> dict[str, str]:
    """The environment without any GIT_* variable (GIT_CONFIG_COUNT/KEY/VALUE, GIT_DIR,
    GIT_EXEC_PATH, GIT_SSH_COMMAND ...): git reads only the user's and the system's config."""
    return {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}


def _git(*args: str) -> str | None:
    try:
        result = subprocess.run(["git", *_GIT_SAFE, *args], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, env=git_environment(),
                                stdin=subprocess.DEVNULL, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None  # no git on this machine, or a repository too slow to read: "unknown"
    return result.stdout.strip() if result.returncode == 0 else None


# The tags a rerun compares with its run's to tell whether the code or the packages changed since.
DIFF_TAG = "git.diff.sha256"  # of `git diff HEAD`; "none" for a clean checkout
# A registered model's factory file is code too, maybe outside the checkout (cnnlab.training.run).
CODE_TAGS = {"mlflow.source.git.commit": "git commit", DIFF_TAG: "uncommitted diff",
             MODEL_SOURCE_HASH_TAG: "registered model's source"}
PACKAGE_TAGS = {f"version.{name}": name for name in ("torch", "lightning", "mlflow", "cnnlab")}

# argv[0] -> the program as a user types it: `cnnlab train` runs Hydra with argv[0] "cnnlab-train",
# `python -m cnnlab.cli` has the module's file there.
_PROGRAMS = {"cnnlab-train": ["cnnlab", "train"], "cnnlab": ["cnnlab"], "cli.py": ["cnnlab"],
             "train.py": ["cnnlab", "train"]}


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command as typed, quoted so that it pastes into a shell: `cnnlab train 'model.kernels=[3,3]'`."""
    argv = list(sys.argv if argv is None else argv)
    program = _PROGRAMS.get(Path(argv[0]).name, [Path(argv[0]).name]) if argv else ["cnnlab"]
    return shlex.join([*program, *argv[1:]])


def _diff_digest(diff: str | None) -> str:
    if diff is None:
        return "unknown"
    return hashlib.sha256(diff.encode()).hexdigest()[:16] if diff else "none"


def changes_since(recorded: Mapping[str, str], now: Mapping[str, str]) -> list[str]:
    """What differs between a run's recorded provenance tags and now, in words
    ("git commit 3e314c9a1f -> 0677c99b2e", "torch 2.14.1 -> 2.15.0"). A tag the run does not
    have (recorded before cnnlab kept it) is not compared."""
    changes = []
    for key, what in {**CODE_TAGS, **PACKAGE_TAGS}.items():
        before, after = recorded.get(key), now.get(key)
        if before is not None and before != after:
            short = 10 if key == "mlflow.source.git.commit" else 16
            changes.append(f"{what} {str(before)[:short]} -> {str(after)[:short]}")
    return changes


def provenance_tags() -> dict[str, str]:
    """Code version, environment and host: what a reader needs to trust a number."""
    import lightning
    import mlflow
    import torch

    import cnnlab
    from cnnlab.training.allocator import in_effect

    commit = _git("rev-parse", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    diff = _git("diff", "--no-ext-diff", "--no-textconv", "HEAD") if commit else None
    return {
        "mlflow.source.git.commit": commit or "unknown (not a git checkout)",
        "git.dirty": "unknown" if dirty is None else str(bool(dirty)).lower(),
        DIFF_TAG: _diff_digest(diff),
        "command": command_line(),
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
    diff = _git("diff", "--no-ext-diff", "--no-textconv", "HEAD")
    if diff:
        tracker.log_text(diff + "\n", "provenance/git.diff")
