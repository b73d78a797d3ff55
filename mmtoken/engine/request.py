"""One request: a prefill and the decode steps that continue it, with everything the hooks keep about it.

Who owns what, and when it dies:
- the `Request` belongs to the request's KV cache (an attribute of the transformers `Cache` object), so it lives
  exactly as long as the cache the caller holds, and two requests on one model never share state;
- while one forward call of the model runs, the request it serves is also the *active* request of the thread
  (a context variable): the hooks of the language model and its layers read it there, so calls in other threads
  or interleaved between decode steps (another request's prefill) never see it;
- what only the prefill needs (its plan, the layer before a cut, the sliced rotary tables) is dropped when the
  prefill ends; what decode steps read (the token set of each stretch of layers, one mask per stretch and step)
  stays with the request.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import Cache

from mmtoken.engine.plan import Plan
from mmtoken.state import CallState

_ATTRIBUTE = "_mmtoken_request"
_ACTIVE: ContextVar[Request | None] = ContextVar("mmtoken_active_request", default=None)


@dataclass
class PrefillScratch:
    """What only the prefill reads: the plan of its cuts, the inputs of the layer before (for scorers that mimic
    it), and per stretch the model's mask with its slice and the rotary tables of the stretch's tokens."""

    plan: Plan
    previous: tuple[nn.Module, torch.Tensor, tuple] | None = None
    slices: dict[int, tuple[object, object, tuple]] = field(default_factory=dict)


@dataclass
class Request:
    """The token state of one request (`call`: which tokens each stretch of layers keeps), its prefill scratch
    (None once the prefill is done), its start time where the prefill is timed, whether a cut before the language
    model `shortened` the prompt, and per stretch the decode mask of the latest step with the model's mask and the
    number of generated tokens it was made for."""

    call: CallState
    prefill: PrefillScratch | None
    decode_masks: dict[int, tuple[object, object, int]] = field(default_factory=dict)
    started: float | None = None
    shortened: bool = False

    @property
    def in_prefill(self) -> bool:
        return self.prefill is not None


def request_of(cache: Cache | None) -> Request | None:
    """The request a KV cache belongs to (None for a cache mmtoken has not seen)."""
    return None if cache is None else getattr(cache, _ATTRIBUTE, None)


def give_to(cache: Cache, request: Request) -> None:
    """Make `request` belong to `cache`, so the decode steps that pass the cache find it."""
    setattr(cache, _ATTRIBUTE, request)


def activate(request: Request | None) -> None:
    """Make `request` the one the hooks of this thread serve, until the call ends (`activate(None)`)."""
    _ACTIVE.set(request)


def active() -> Request:
    """The request of the forward call running in this thread."""
    request = _ACTIVE.get()
    if request is None:
        raise RuntimeError("mmtoken: a language-model call arrived outside a call of the patched model")
    return request
