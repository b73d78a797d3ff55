"""The methods by name: `@register` records a Method class under its `name`, and `build` makes a Method from what
a user gives (a name and parameters, a dict, a YAML file or a ready object)."""

from __future__ import annotations

from dataclasses import MISSING, fields
from os import PathLike
from pathlib import Path
from typing import TypeVar

from mmtoken.methods.base import Method, check_parameters

METHODS: dict[str, type[Method]] = {}
MethodClass = TypeVar("MethodClass", bound=type[Method])


def register(cls: MethodClass) -> MethodClass:
    """Class decorator: users name `cls` by its `name` (`mmtoken.patch(model, cls.name)`). A name is taken once: a
    second class of the same name is a ValueError."""
    taken = METHODS.get(cls.name)
    if taken is not None:
        raise ValueError(f"method name {cls.name!r} is taken by {taken.__module__}.{taken.__qualname__}")
    METHODS[cls.name] = cls
    return cls


def _defaults(cls: type[Method]) -> dict[str, object]:
    return {field.name: None if field.default is MISSING else field.default for field in fields(cls)}


def list_methods() -> list[dict[str, object]]:
    """Every method, by name: name, parameters with their defaults, stage and paper."""
    return [
        {"name": name, "parameters": _defaults(cls), "stage": cls.stage, "paper": cls.paper, "doc": cls.__doc__}
        for name, cls in sorted(METHODS.items())
    ]


def _is_method_file(method: object) -> bool:
    return isinstance(method, PathLike) or (isinstance(method, str) and method.lower().endswith((".yaml", ".yml")))


def _method_file(path: str | PathLike) -> dict:
    """The method dict a YAML file holds; ValueError for a file that cannot be read or parsed, TypeError for one
    that holds no mapping."""
    import yaml

    try:
        config = yaml.safe_load(Path(path).read_text())
    except OSError as error:
        raise ValueError(f"cannot read the method file {str(path)!r}: {error.strerror or error}") from error
    except yaml.YAMLError as error:
        raise ValueError(f"the method file {str(path)!r} is not valid YAML: {error}") from error
    if not isinstance(config, dict):
        raise TypeError(f"the method file {str(path)!r} must hold a mapping such as `method: fastv`, not {config!r}")
    return config


def build(method: str | PathLike | dict | Method, **params: object) -> Method:
    """A Method from a name and parameters, a dict ({"method": name, **parameters}, as in YAML), a path to such
    a YAML file (a `str` ending in .yaml or .yml, or a path object), or a Method object. Parameters are checked
    against their fields' types (a ready Method's too: it may have been changed since it was made) and ranges."""
    if isinstance(method, Method):
        if params:
            raise TypeError(f"parameters {sorted(params)} given with a ready Method object")
        check_parameters(method)
        return method
    if _is_method_file(method):
        method = _method_file(method)
    if isinstance(method, dict):
        config = dict(method)
        if "method" not in config:
            raise KeyError(f"a method dict needs a 'method' key naming one of {sorted(METHODS)}")
        method = config.pop("method")
        params = {**config, **params}
    if not isinstance(method, str):
        raise TypeError(f"method must be a name, a dict, a YAML path or a Method, not {type(method).__name__}")
    if method not in METHODS:
        raise KeyError(f"unknown method {method!r}; known: {', '.join(sorted(METHODS))}")
    cls = METHODS[method]
    known = _defaults(cls)
    unknown = sorted(map(str, set(params) - set(known)))
    if unknown:
        raise TypeError(f"{method}: unknown parameter(s) {', '.join(unknown)}; parameters: {', '.join(known)}")
    return cls(**params)
