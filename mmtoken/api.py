"""The public entry points: patch, unpatch, patched."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from os import PathLike

import torch
from torch import nn

from mmtoken.accounting.stats import Stats
from mmtoken.engine.hooks import Engine
from mmtoken.integrations import adapter_for
from mmtoken.methods import Method, build

_ATTRIBUTE = "_mmtoken_handle"
_SUPPORTED_ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flash_attention_4")


class Handle:
    """A method attached to a model. `stats` holds the numbers of the latest prefill (None before one)."""

    def __init__(self, model: nn.Module, method: Method) -> None:
        adapter = adapter_for(model)
        implementation = adapter.language_model.config._attn_implementation
        if implementation not in _SUPPORTED_ATTENTION:
            raise ValueError(f"attention {implementation!r} is not supported; use one of {_SUPPORTED_ATTENTION}")
        method.check_depth(len(adapter.decoder_layers))
        self.model, self.method = model, method
        self.engine = Engine(model, adapter, method)

    @property
    def stats(self) -> Stats | None:
        return self.engine.stats

    def alive_visual_tokens(self) -> dict[int, list[torch.Tensor]] | None:
        """The visual tokens of the latest prefill (None before one) that survive at each stage: keyed by the first
        decoder layer of each stretch of layers that share a token set (0: what the language model receives), a
        list over batch rows of (n, 4) long tensors holding each surviving token's media index, frame, row and
        column in its patch grid (column -1 for a token without a grid cell: LLaVA's CLS or image_newline)."""
        return self.engine.alive_visual_tokens()

    def remove(self) -> None:
        self.engine.detach()
        delattr(self.model, _ATTRIBUTE)


def patch(model: nn.Module, method: str | PathLike | dict | Method, **params: object) -> Handle:
    """Attach `method` (a name with parameters, a dict or YAML path, or a Method) to an already-loaded model.

    Everything is checked before anything is attached: the method and its parameters, the model family, and
    that the schedule fits the model's depth.
    """
    if hasattr(model, _ATTRIBUTE):
        raise RuntimeError("this model is already patched by mmtoken; call mmtoken.unpatch(model) first")
    handle = Handle(model, build(method, **params))
    handle.engine.attach()
    setattr(model, _ATTRIBUTE, handle)
    return handle


def unpatch(model: nn.Module) -> None:
    """Remove mmtoken's hooks; the model is exactly as it was before `patch`."""
    handle = getattr(model, _ATTRIBUTE, None)
    if handle is None:
        raise RuntimeError("this model is not patched by mmtoken")
    handle.remove()


@contextmanager
def patched(model: nn.Module, method: str | PathLike | dict | Method, **params: object) -> Iterator[Handle]:
    """`patch` for the length of a `with` block."""
    handle = patch(model, method, **params)
    try:
        yield handle
    finally:
        unpatch(model)
