"""mmtoken: cut the visual tokens of an already-loaded multimodal LLM, and measure what it costs and saves.

The names below load on first use, so that `mmtoken --help` does not wait for torch and transformers."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mmtoken import methods
    from mmtoken.api import Handle, patch, patched, unpatch
    from mmtoken.methods import list_methods

_HOMES = {"Handle": "mmtoken.api", "patch": "mmtoken.api", "patched": "mmtoken.api", "unpatch": "mmtoken.api",
          "list_methods": "mmtoken.methods", "methods": "mmtoken.methods"}  # fmt: skip


def __getattr__(name: str) -> object:
    if name not in _HOMES:
        raise AttributeError(f"module 'mmtoken' has no attribute {name!r}")
    module = importlib.import_module(_HOMES[name])
    return module if name == "methods" else getattr(module, name)


__all__ = ["Handle", "list_methods", "methods", "patch", "patched", "unpatch"]
