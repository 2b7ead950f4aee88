"""cnnlab: CNN experiments as data, trained with Lightning, composed with Hydra, tracked in MLflow.

Public names are loaded on first use (PEP 562): every `cnnlab` command imports this package, and
none of them should pay for torch, Lightning or MLflow before it needs them.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public name -> "module:attribute", imported on first access.
_LAZY = {
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
