"""Python's cyclic garbage collector, kept out of a run's start-up and of its exit.

A run imports torch, Lightning, torchmetrics (which brings torchvision, torch._dynamo, sympy,
scipy and matplotlib) and MLflow: about a million long-lived objects. With the collector's
defaults, the imports alone trigger collection after collection that walk them all, and the
interpreter's finalisation walks the whole heap again several times on the way out.
Measured on the team's 2-core machine (`benchmarks/fixed_cost.py --parts`, BENCHMARKS.md):
`import torch, lightning, mlflow` took 6.1 s to the process's exit with the defaults, 3.3 s
with the collector off during the imports and the heap frozen before the exit.

So `cnnlab`'s own process (not a caller of `train()` in its process: a test, a notebook)
switches the collector off until training starts, then freezes what start-up left (it stays
for the whole run anyway; later collections skip it) and switches it on again; and it
freezes the heap once more before exiting. atexit handlers, file and log flushes still run
at exit; only the collector's passes over objects about to vanish with the process are skipped.
"""

from __future__ import annotations

import gc

_deferred = False  # switched off by defer() and not yet on again


def defer() -> None:
    """No collections during start-up (called first thing by a training command's process)."""
    global _deferred
    if gc.isenabled():
        gc.disable()
        _deferred = True


def resume() -> None:
    """Start-up is over: freeze what exists (long-lived from here on) and collect again."""
    global _deferred
    if _deferred:
        gc.freeze()
        gc.enable()
        _deferred = False


def before_exit() -> None:
    """The process is about to end: the finalisation's collections need not walk the heap."""
    gc.freeze()
