"""Your own nn.Module, by name: `cnnlab.register_model("mynet", factory)` in Python, or an entry
point in the group `cnnlab.models` of an installed package:

    [project.entry-points."cnnlab.models"]
    mynet = "mypackage.models:make_mynet"

A factory is called as `factory(num_classes, input_shape, **model.args)` (input_shape is
(C, H, W)) and returns an nn.Module that maps a (B, C, H, W) batch to (B, num_classes) logits.
`model=registered model.name=mynet model.args={width:32}` then trains it like any other model.

A name registered in Python wins over an entry point of the same name, and registering a name
again replaces its factory (a notebook cell run twice). Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path

from cnnlab.errors import ConfigError

ENTRY_POINT_GROUP = "cnnlab.models"
_REGISTERED: dict[str, Callable] = {}


def register_model(name: str, factory: Callable) -> Callable:
    """Make `factory` trainable as `model=registered model.name=NAME`; returns the factory, so
    it also works as a decorator's body (`register_model("mynet", make_mynet)`)."""
    if not isinstance(name, str) or not name.strip() or any(c in name for c in " =,[]{}:'\""):
        raise ConfigError(f"register_model: the name must be a non-empty string without spaces or any "
                          f"of = , [ ] {{ }} : ' \" (it is written on the command line), got {name!r}")
    if not callable(factory):
        raise ConfigError(f"register_model({name!r}, ...): the factory must be callable "
                          f"(num_classes, input_shape, **args) -> nn.Module, got {factory!r}")
    _REGISTERED[name] = factory
    return factory


def _entry_points() -> dict:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def registered_names() -> list[str]:
    return sorted({*_REGISTERED, *_entry_points()})


def factory_of(name: str | None) -> Callable:
    """The factory registered as `name` (Python first, then entry points); one line when unknown."""
    if name is None:
        names = registered_names()
        raise ConfigError(f"model=registered needs model.name=NAME; registered: "
                          f"{', '.join(names) if names else '(none)'}")
    if name in _REGISTERED:
        return _REGISTERED[name]
    found = _entry_points().get(name)
    if found is None:
        names = registered_names()
        raise ConfigError(f"model.name={name!r} is not a registered model; registered: "
                          f"{', '.join(names) if names else '(none)'} (register one with "
                          f"cnnlab.register_model(name, factory) or an entry point in group "
                          f"'{ENTRY_POINT_GROUP}')")
    try:
        factory = found.load()
    except Exception as error:  # an entry point's import fails with whatever its module raises
        raise ConfigError(f"model.name={name!r}: its entry point {found.value!r} does not load "
                          f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})") from error
    if not callable(factory):
        raise ConfigError(f"model.name={name!r}: its entry point {found.value!r} is not callable")
    return factory


def source_of(factory: Callable) -> tuple[str, str]:
    """(the factory's source file, its sha256): what `cnnlab reproduce` checks is unchanged."""
    target = inspect.unwrap(factory)
    if not (inspect.isfunction(target) or inspect.isclass(target) or inspect.ismethod(target)):
        target = type(target)  # a callable object: its class's file
    try:
        path = inspect.getsourcefile(target)
    except TypeError:  # a builtin or C extension has no source file
        path = None
    if path is None or not Path(path).is_file():
        return "(no source file)", ""
    return str(Path(path).resolve()), hashlib.sha256(Path(path).read_bytes()).hexdigest()
