"""The named methods, each a preset of a schedule, a scorer and a reducer in a module of its own, registered by
name with `@register`. Importing this package imports each of its modules, so a new method is one new file; each
registered class is exported here under its class name (`mmtoken.methods.FastV`)."""

from __future__ import annotations

import importlib
import pkgutil

from mmtoken.methods.base import Method
from mmtoken.methods.registry import METHODS, build, list_methods, register

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

globals().update({cls.__name__: cls for cls in METHODS.values()})

__all__ = ["METHODS", "Method", "build", "list_methods", "register", *sorted(cls.__name__ for cls in METHODS.values())]
