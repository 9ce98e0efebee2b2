"""Conditioners by name: registration, discovery, and `load_conditioner(name_or_folder, pipe)`.

A conditioner registers itself with `@register_conditioner("name")` in its own module. The registry
imports every module of `condkit.conditioning` itself (no list to edit), then every entry point of
the group `condkit.conditioners`, so another package registers with one line of its metadata:

    [project.entry-points."condkit.conditioners"]
    my-conditioner = "my_package.my_conditioner"          # a module that uses @register_conditioner
    # or "my_package.my_conditioner:MyConditioner" (a Conditioner class, registered under the entry's name)
"""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable, TypeVar

from condkit.conditioning.base import Conditioner

ENTRY_POINT_GROUP = "condkit.conditioners"
_REGISTRY: dict[str, type[Conditioner]] = {}
_discovered = False
C = TypeVar("C", bound=type[Conditioner])


def register_conditioner(name: str) -> Callable[[C], C]:
    """Class decorator: make a conditioner available by name (Python API and `--conditioner NAME`)."""

    def decorate(cls: C) -> C:
        _register(name, cls)
        return cls

    return decorate


def _register(name: str, cls: type[Conditioner]) -> None:
    registered = _REGISTRY.get(name)
    if registered is not None and registered.__qualname__ != cls.__qualname__:
        raise ValueError(f"conditioner name {name!r} is already registered to {registered.__name__}")
    _REGISTRY[name] = cls
    cls.registered_name = name


def discover() -> None:
    """Import condkit's conditioner modules and the `condkit.conditioners` entry points (once)."""
    global _discovered
    if _discovered:
        return
    package = importlib.import_module("condkit.conditioning")
    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{module.name}")
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = entry_point.load()
        except Exception as error:
            raise ValueError(
                f"entry point {entry_point.name} = {entry_point.value!r} (group {ENTRY_POINT_GROUP}) failed to import: "
                f"{type(error).__name__}: {error}"
            ) from None
        if inspect.isclass(loaded) and issubclass(loaded, Conditioner) and loaded.registered_name is None:
            _register(entry_point.name, loaded)
    _discovered = True


def rediscover() -> None:
    """Discover again (after installing a package that registers conditioners)."""
    global _discovered
    _discovered = False
    discover()


def available_conditioners() -> list[str]:
    discover()
    return sorted(_REGISTRY)


def get_conditioner_class(name: str) -> type[Conditioner]:
    discover()
    if name not in _REGISTRY:
        raise ValueError(f"unknown conditioner {name!r}; expected one of: {', '.join(sorted(_REGISTRY))} or a saved conditioner folder")
    return _REGISTRY[name]


def load_conditioner(name_or_folder: str | os.PathLike | Conditioner, pipe: Any, **options: Any) -> Conditioner:
    """A conditioner on `pipe`: a registered name (built with `options`) or a folder from save_pretrained
    (`options` override its saved config). A Conditioner instance is returned as it is."""
    if isinstance(name_or_folder, Conditioner):
        if options:
            raise ValueError("options apply to a conditioner name or folder, not to a conditioner instance")
        return name_or_folder
    text = os.fspath(name_or_folder)
    discover()
    if Path(text).is_dir():
        return _naming_unknown_options(text, lambda: Conditioner.from_pretrained(text, pipe, **options))
    if text not in _REGISTRY and (os.sep in text or text.startswith(".")):
        raise FileNotFoundError(f"conditioner folder {text!r} does not exist")
    cls = get_conditioner_class(text)
    return _naming_unknown_options(text, lambda: cls.from_pipeline(pipe, **options))


def _naming_unknown_options(what: str, build: Callable[[], Conditioner]) -> Conditioner:
    try:
        return build()
    except TypeError as error:
        message = str(error)
        if "unexpected keyword argument" in message:
            raise ValueError(f"conditioner {what!r} has no option {message.rsplit(' ', 1)[-1]}") from None
        raise
