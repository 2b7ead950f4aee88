"""cnnlab: CNN experiments as data, trained with Lightning, composed with Hydra, tracked in MLflow.

The Python API (`cnnlab.train`, `cnnlab.summary`, `cnnlab.compare`, `cnnlab.load`,
`cnnlab.register_model`) is loaded on first use (PEP 562): every `cnnlab` command imports this
package, and none of them should pay for torch, Lightning or MLflow before it needs them.
"""

from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

# Public name -> "module:attribute", imported on first access.
_LAZY = {
    "train": "cnnlab.api:train",
    "summary": "cnnlab.api:summary",
    "compare": "cnnlab.api:compare",
    "Result": "cnnlab.training.result:Result",
    "load": "cnnlab.serving.load:load",
    "register_model": "cnnlab.model.registry:register_model",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'cnnlab' has no attribute {name!r}")
    module, _, attribute = _LAZY[name].partition(":")
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # found once; later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


class _Package(types.ModuleType):
    """`cnnlab.train` is the API's function, though `cnnlab/train.py` (the Hydra app, `python -m
    cnnlab.train`) is a submodule of the same name: importing a submodule sets it as an attribute of
    its package, and `cnnlab.train(...)` would then call a module. A lazy name keeps its function;
    the submodule stays importable by name (`from cnnlab.train import main`)."""

    def __setattr__(self, name: str, value: object) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
