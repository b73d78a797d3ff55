"""One request: a prefill and the decode steps that continue it, with everything the hooks keep about it.

Who owns what, and when it dies:
- the `Request` belongs to the request's KV cache (an attribute of the transformers `Cache` object), so it lives
  exactly as long as the cache the caller holds, and two requests on one model never share state;
- while one forward call of the model runs, the request it serves is also the *active* request of the thread
  (a context variable): the hooks of the language model and its layers read it there, so calls in other threads
  or interleaved between decode steps (another request's prefill) never see it;
- what only the prefill needs (its plan, the layer before a cut, the sliced rotary tables) is dropped when the
  prefill ends; what decode steps read stays with the request: each layer's `CacheRecord` (which entries its
  cache holds, shared by the layers that hold the same).
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import Cache

from mmtoken.engine.embedding import ChunkedPrompt
from mmtoken.engine.plan import Plan
from mmtoken.engine.record import CacheRecord, gather_entries
from mmtoken.ops import scatter_sum
from mmtoken.state import CallState

_ATTRIBUTE = "_mmtoken_request"
_ACTIVE: ContextVar[Request | None] = ContextVar("mmtoken_active_request", default=None)


@dataclass
class PrefillScratch:
    """What only the prefill reads: the plan of its cuts, the prompt a streaming prefill embeds chunk by chunk,
    whether its cuts keep padding (a prefill padded to a bucket of lengths, `mmtoken.graphs`), the inputs of the
    layer before (for scorers that mimic it), per stretch the model's mask with its slice and the rotary tables of
    the stretch's tokens, and per layer the inputs and rotary tables of the prompt's last tokens (for presses that
    read their queries)."""

    plan: Plan
    prompt: ChunkedPrompt | None = None
    keep_padding: bool = False
    previous: tuple[nn.Module, torch.Tensor, tuple] | None = None
    slices: dict[int, tuple[object, object, tuple]] = field(default_factory=dict)
    windows: dict[int, tuple[torch.Tensor, tuple]] = field(default_factory=dict)


@dataclass
class Request:
    """The token state of one request (`call`: which tokens each stretch of layers kept at prefill), its prefill
    scratch (None once the prefill is done), its start time where the prefill is timed, whether the first layer's
    cache holds fewer entries than the tokens the model has seen (`shortened`: by a cut before the language model or
    a press of the first layer), and from the end of the prefill on: the record of each layer's KV cache,
    how many tokens entered after the prompt (`generated`) and the position the first of them takes
    (`next_position`: (batch, 1), or (rows, batch, 1) for M-RoPE), where a cache of fixed size holds them
    (`mmtoken.graphs`), its masks of a decode step by layer (`step_masks`), and for eviction while decoding the
    attention each layer's entries received so far (`attention_sums`)."""

    call: CallState
    prefill: PrefillScratch | None
    started: float | None = None
    shortened: bool = False
    records: list[CacheRecord] | None = None
    generated: int = 0
    next_position: torch.Tensor | None = None
    step_masks: Callable[[int, torch.dtype], torch.Tensor] | None = None
    attention_sums: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def in_prefill(self) -> bool:
        return self.prefill is not None

    def record_layers(self, depth: int) -> None:
        """At the end of the prefill: each layer's cache holds the tokens of its stretch."""
        received = len(self.call.sets[0])
        by_stretch = {
            start: CacheRecord(tokens.slot, tokens.valid, tokens.complete, received)
            for start, tokens in self.call.sets.items()
        }
        self.records = [by_stretch[self.call.stretch_of(layer)] for layer in range(depth)]

    def positions_of_next(self, count: int) -> torch.Tensor:
        """The positions of the next `count` tokens, as `generate` gives them (for a caller that gives none, where the
        model would count them from the first layer's cache, which a cut or a press shortened)."""
        return self.next_position + self.generated + torch.arange(count, device=self.next_position.device)

    def advance(self, count: int) -> None:
        """A decode step of `count` tokens starts: each layer's cache is about to hold them too."""
        for record in {id(record): record for record in self.records}.values():
            record.append(count)
        self.generated += count


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


def _request_to_press(cache: Cache, layer: int, operation: str) -> Request:
    request = request_of(cache)
    if request is None or request.records is None:
        raise ValueError(f"{operation} needs the KV cache of a request that a patched model has prefilled")
    if request.step_masks is not None:
        raise ValueError(f"{operation}: this cache has fixed sizes (cuda_graphs); {operation} before its decode steps")
    if not 0 <= layer < len(request.records):
        raise ValueError(f"{operation}: layer must be in [0, {len(request.records)}), got {layer}")
    return request


def _pressed(request: Request, layer: int, record: CacheRecord) -> None:
    """Layer `layer`'s cache now holds the entries of `record`. Where the first layer's does, the model, which sizes
    its own masks by that cache, is given the padding mask of its record at decode (`shortened`)."""
    request.records[layer] = record
    request.shortened |= layer == 0


def compact(cache: Cache, layer: int, keep: torch.Tensor, fillers: torch.Tensor | None = None) -> None:
    """Keep only the entries `keep` (batch, n: indices into what the layer's cache holds now, in the order to keep
    them) of decoder layer `layer`'s KV cache, freeing the others; the request's later decode steps read the new
    record, in which the entries where `fillers` (batch, n) is True are hidden (they fill up rows that keep fewer).
    After layer 0 is compacted, the request's decode steps mask it by its record, as after a cut before the language
    model."""
    request = _request_to_press(cache, layer, "compact")
    gather_entries(cache, layer, keep)
    _pressed(request, layer, request.records[layer].gathered(keep, fillers))


def pool(cache: Cache, layer: int, group: torch.Tensor) -> None:
    """Replace decoder layer `layer`'s KV entries by the means of their groups: `group` (batch, n) numbers each
    entry's group in the order of the entries (-1: the entry leaves). A group stands at its first entry's place in
    the record; rows with fewer groups are filled with entries no query sees. Layer 0 too, as by `compact`."""
    request = _request_to_press(cache, layer, "pool")
    entries, record = cache.layers[layer], request.records[layer]
    member = group >= 0
    width = int(group.max()) + 1
    target = group.clamp(min=0)
    count = torch.zeros(group.shape[0], width, device=group.device).scatter_add_(1, target, member.float())
    held = torch.cat([entries.keys, entries.values], -1)  # (batch, heads, n, 2 x dim): both summed in one sort
    total = scatter_sum((held.float() * member[:, None, :, None]).transpose(1, 2), target, width).transpose(1, 2)
    means = (total / count.clamp(min=1)[:, None, :, None]).to(held.dtype)
    entries.keys, entries.values = (part.contiguous() for part in means.split(entries.keys.shape[-1], dim=-1))
    slot = record.slot.masked_fill(~member, torch.iinfo(record.slot.dtype).max)
    first = torch.full_like(count, torch.iinfo(record.slot.dtype).max, dtype=record.slot.dtype).scatter_reduce(
        1, target, slot, "amin"
    )
    valid = count > 0
    _pressed(request, layer, CacheRecord(first.masked_fill(~valid, 0), valid, bool(valid.all()), record.next_slot))
