"""cnnlab: CNN experiments as data, trained with Lightning, composed with Hydra, tracked in MLflow."""

__version__ = "0.1.0"

# The Python API, imported on first use (PEP 562): `import cnnlab` stays free of torch and MLflow.
_API = {"load": "cnnlab.serving.load:load"}


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'cnnlab' has no attribute {name!r}")
    import importlib

    module, attribute = _API[name].split(":")
    return getattr(importlib.import_module(module), attribute)


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
