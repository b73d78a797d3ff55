"""KV presses: what stays in each decoder layer's KV cache once the prefill is done (the `on_cache` stage).

A press scores the entries of one layer's cache; the engine keeps the best of them (`mmtoken.engine.pressing`) and
frees the rest. Each press is a small dataclass with one `score()`, in a module of its own; the methods that use
them (`mmtoken.methods.snapkv` and its siblings) are registered by name like the token methods.
"""

from mmtoken.kv.base import Press, PressInput

__all__ = ["Press", "PressInput"]
