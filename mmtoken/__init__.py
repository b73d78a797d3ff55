"""mmtoken: cut the visual tokens of an already-loaded multimodal LLM, and measure what it costs and saves."""

from mmtoken import methods
from mmtoken.api import Handle, patch, patched, unpatch
from mmtoken.methods import list_methods

__all__ = ["Handle", "list_methods", "methods", "patch", "patched", "unpatch"]
