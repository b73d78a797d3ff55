"""Prefills replayed from CUDA graphs: once the cuts before the language model are made, a fixed-budget method's
prefill has static shapes (every count is planned on the CPU), so the language model's whole forward, with the
engine's layer hooks and their cuts inside it, is captured once per *prefill signature* and replayed.

Prompts of nearby lengths share a graph: the sequence the language model receives is padded on the left up to a
multiple of `PROMPT_STEP` (its *bucket*), and the cuts inside keep that padding (still masked), so that every
set's width follows from the bucket and the visual counts, not from the length of the question.

The signature is everything the forward's Python reads on the host: the batch, the buckets of the prompt and of
what the language model receives, each row's visual counts before and after the cut before the language model,
and the shapes of the arguments. A signature runs eagerly the first time, watched for host synchronisations (a
scorer that reads the device from the host cannot be graphed, and stays eager); the second time it is captured,
then replayed. A method whose KV press reads the prompt's last queries (SnapKV) prefills eagerly.

A graph reads fixed memory: the arguments, and the request's state that the hooks read (token kinds, padding, the
tokens the language model receives), are copied into the graph's own before each replay (a prompt that fills its
bucket without padding goes without a mask, so that sdpa's causal kernel runs); what the hooks build inside the
graph (the token sets of later layers, the KV cache, the last hidden state) is copied out into the request's own
after it.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast

from mmtoken.compat import CACHE_NAMES, cache_in, with_cache
from mmtoken.engine.attending import attention_in
from mmtoken.engine.request import PrefillScratch, Request, active
from mmtoken.graphs.attention import GRAPHED_PREFILL
from mmtoken.graphs.capture import capture
from mmtoken.methods.base import CachePress, Method
from mmtoken.scorers.base import decides_count
from mmtoken.state import TEXT, TokenSet

# A prefill whose layers hold more tokens than this on average (all rows together) is bound by arithmetic, not
# by kernel launches, and ran slower from a graph on an H200 (BENCHMARKS.md: LLaVA-1.5-7B keep-all at batch 8,
# 4872 tokens, 0.89x; OneVision-7B keep-all, 6273 tokens, 0.68x), so it stays eager.
GRAPHED_TOKENS = 2048
SYNC_WARNING = "called a synchronizing CUDA operation"  # what torch's sync debug mode warns at each one
MAX_GRAPHS = 8  # captured signatures kept per method on one language model; the least recently used goes first
PROMPT_STEP = 32  # prompt lengths are padded up to a multiple of this


def bucket(length: int) -> int:
    """The length a prompt of `length` tokens is padded to."""
    return -(-length // PROMPT_STEP) * PROMPT_STEP


def _cloned(tokens: TokenSet) -> TokenSet:
    weight = None if tokens.weight is None else tokens.weight.clone()
    return TokenSet(tokens.position.clone(), tokens.slot.clone(), tokens.valid.clone(), list(tokens.visual_counts),
                    tokens.complete, weight)  # fmt: skip


@dataclass
class _RequestInputs:
    """The tensors of a request's state that the layer hooks read: token kinds and padding by prompt position, the
    tokens the language model receives, and the vision signal."""

    kinds: torch.Tensor
    padding: torch.Tensor
    received: TokenSet
    signal: torch.Tensor | None

    @classmethod
    def of(cls, request: Request) -> _RequestInputs:
        call = request.call
        return cls(call.kinds, call.padding, call.sets[0], call.vision_signal)

    def _by_position(self) -> list[tuple[torch.Tensor, object]]:
        """The tensors indexed by prompt position, each with what fills it past the prompt's end."""
        listed = [(self.kinds, TEXT), (self.padding, True), (self.signal, 0.0)]
        return [(tensor, filler) for tensor, filler in listed if tensor is not None]

    def fixed(self) -> _RequestInputs:
        """Copies for a graph to read, those indexed by prompt position as long as the prompt's bucket."""
        length = bucket(self.kinds.shape[1])
        kinds, padding, *signal = [
            tensor.new_full((tensor.shape[0], length), filler).index_copy_(1, _columns(tensor), tensor)
            for tensor, filler in self._by_position()
        ]
        return _RequestInputs(kinds, padding, _cloned(self.received), signal[0] if signal else None)

    def copy_from(self, own: _RequestInputs) -> None:
        """Copy a request's inputs into these fixed ones (a prompt of the same bucket)."""
        for (fixed, filler), (tensor, _) in zip(self._by_position(), own._by_position(), strict=True):
            fixed[:, : tensor.shape[1]].copy_(tensor)
            fixed[:, tensor.shape[1] :].fill_(filler)
        for name in ("position", "slot", "valid", "weight"):
            fixed = getattr(self.received, name)
            if fixed is not None:
                fixed.copy_(getattr(own.received, name))

    def put(self, request: Request) -> None:
        call = request.call
        call.kinds, call.padding, call.vision_signal = self.kinds, self.padding, self.signal
        call.sets[0] = self.received


@dataclass
class _PrefillGraph:
    """One prefill signature's graph: its fixed arguments and request inputs, the cache and last hidden state it
    writes, the token sets its hooks build (by first layer), and the prefill scratch of the capture, whose planned
    counts on the device the graph reads."""

    arguments: dict[str, object]
    inputs: _RequestInputs
    graph: torch.cuda.CUDAGraph | None = None
    cache: DynamicCache | None = None
    hidden: torch.Tensor | None = None
    sets: dict[int, TokenSet] = field(default_factory=dict)
    scratch: PrefillScratch | None = None


def _columns(tensor: torch.Tensor) -> torch.Tensor:
    return torch.arange(tensor.shape[1], device=tensor.device)


def _padded_to_bucket(request: Request, kwargs: dict) -> tuple[dict, int]:
    """Pad the sequence the language model receives on the left up to its bucket: the arguments, and the request's
    token set of it (the padding invalid, at prompt position 0). Returns the arguments and the padding's length."""
    call, tokens = request.call, request.call.sets[0]
    pads = bucket(len(tokens)) - len(tokens)
    if pads:
        batch, device = call.batch_size, tokens.position.device
        zeros = torch.zeros(batch, pads, dtype=tokens.position.dtype, device=device)
        position = torch.cat([zeros, tokens.position], dim=1)
        slot = torch.arange(position.shape[1], device=device).expand(batch, -1)
        valid = torch.cat([zeros.bool(), tokens.valid], dim=1)
        weight = None if tokens.weight is None else torch.cat([torch.ones_like(zeros, dtype=tokens.weight.dtype),
                                                               tokens.weight], dim=1)  # fmt: skip
        embeds, positions = kwargs["inputs_embeds"], kwargs.get("position_ids")
        kwargs = {**kwargs, "inputs_embeds": torch.cat([embeds.new_zeros(batch, pads, embeds.shape[2]), embeds], 1)}
        if positions is None:  # the model's own: the prompt's positions
            kwargs["position_ids"] = position
        else:
            kwargs["position_ids"] = torch.cat([positions.new_zeros(*positions.shape[:-1], pads), positions], -1)
        tokens = call.sets[0] = TokenSet(position, slot, valid, list(tokens.visual_counts), False, weight)
        request.shortened = True  # decode steps mask by the cache's record, which holds the padding
    return {**kwargs, "attention_mask": None if tokens.complete else tokens.valid.long()}, pads


def _signature(request: Request, kwargs: dict) -> tuple | None:
    """What the prefill's Python reads on the host (None where a graph cannot hold the call)."""
    call, received = request.call, request.call.sets[0]
    arguments = tuple(
        (name, (tuple(value.shape), value.dtype) if torch.is_tensor(value) else value)
        for name, value in sorted(kwargs.items())
        if name not in CACHE_NAMES
    )
    key = (tuple(call.visual_counts), bucket(call.prompt_length), tuple(received.visual_counts), len(received),
           received.complete, call.vision_signal is None, arguments)  # fmt: skip
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _counts_planned(request: Request) -> bool:
    """Whether every cut inside the language model keeps a planned count (none decides it on the device)."""
    plan = request.prefill.plan
    return not any(decides_count(cut.scorer) for layer, cuts in plan.cuts.items() if layer > 0 for cut in cuts)


def _mean_tokens(request: Request) -> float:
    """The tokens the prefill's layers hold on average, as planned, all rows together (each as long as the
    longest)."""
    call, plan = request.call, request.prefill.plan
    visual, total = list(call.sets[0].visual_counts), 0
    for layer in range(plan.depth):
        for cut in plan.cuts.get(layer, []) if layer > 0 else []:
            visual = [min(count, kept) for count, kept in zip(visual, cut.keep, strict=True)]
        total += max(text + count for text, count in zip(call.text_counts, visual, strict=True))
    return call.batch_size * total / plan.depth


@dataclass
class _Known:
    """What a language model's prefills taught: the graphs captured (by method and signature, most recently used
    last; methods patched in turn keep theirs), the signatures seen once, and those that stay eager. It outlives a
    patch, as the decode graphs' pool:
    a graph reads only the model's weights and its own memory, so a later patch of the same method replays it."""

    pool: object
    graphs: OrderedDict[tuple, _PrefillGraph] = field(default_factory=OrderedDict)
    seen: set[tuple] = field(default_factory=set)
    eager: set[tuple] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)


_KNOWN: weakref.WeakKeyDictionary[nn.Module, dict[bool, _Known]] = weakref.WeakKeyDictionary()


class PrefillGraphs:
    """Runs the language model's prefill under `method` from CUDA graphs, one per prefill signature, with
    `capture`; without, the same path (fixed arguments and inputs copied in, results copied out) run eagerly, which
    the CPU tests compare with the plain patch."""

    def __init__(self, language_model: nn.Module, method: Method, capture: bool) -> None:
        self.language_model, self.method = language_model, repr(method)
        # a press that reads the prompt's last queries takes them from the layer hooks, which a replay skips
        self.eager = any(isinstance(step, CachePress) and step.press.window for step in method.steps)
        by_capture = _KNOWN.setdefault(language_model, {})
        if capture not in by_capture:
            by_capture[capture] = _Known(torch.cuda.graph_pool_handle() if capture else None)
        self.known = by_capture[capture]
        self.pool = self.known.pool
        self._forward_inside: Callable[..., object] | None = None
        self._wraps_an_override = False

    def signatures(self) -> list[tuple]:
        """The prefill signatures of this method that have a graph."""
        return [key[1:] for key in self.known.graphs if key[0] == self.method]

    def attach(self) -> None:
        self._wraps_an_override = "forward" in vars(self.language_model)  # the decode graphs' over the model's
        self._forward_inside = self.language_model.forward
        self.language_model.forward = self._forward

    def detach(self) -> None:
        if self._wraps_an_override:
            self.language_model.forward = self._forward_inside
        else:
            del self.language_model.forward

    def _run(self, kwargs: dict, cache: object) -> object:
        with attention_in(self.language_model.config, GRAPHED_PREFILL):
            return self._forward_inside(**{**kwargs, **with_cache(cache)})

    def _forward(self, *args: object, **kwargs: object) -> object:
        cache = cache_in(kwargs)
        request = active()
        if self.eager or args or cache is None or not request.in_prefill or cache.get_seq_length() > 0:
            return self._forward_inside(*args, **kwargs)
        asks_more = kwargs.get("output_hidden_states") or kwargs.get("output_attentions")
        if asks_more or not _counts_planned(request) or _mean_tokens(request) > GRAPHED_TOKENS:
            return self._forward_inside(**kwargs)
        kwargs, pads = _padded_to_bucket(request, kwargs)
        request.prefill.keep_padding = True
        output = self._graphed(request, kwargs, cache)
        output.last_hidden_state = output.last_hidden_state[:, pads:]  # the caller's tokens, as received
        return output

    def _graphed(self, request: Request, kwargs: dict, cache: object) -> object:
        """The prefill of a padded prompt: eager the first time and where a graph cannot hold it, else replayed."""
        signature = _signature(request, kwargs)
        known, key = self.known, (self.method, signature)
        if signature is None or key in known.eager:
            return self._forward_inside(**kwargs)
        with known.lock:
            if key not in known.graphs:
                if key not in known.seen:
                    known.seen.add(key)
                    return self._first_run(key, kwargs, cache)
                known.graphs[key] = self._prepare(request, kwargs)
                mine = [other for other in known.graphs if other[0] == self.method]  # least recently used first
                for evicted in mine[: max(0, len(mine) - MAX_GRAPHS)]:
                    del known.graphs[evicted]
            known.graphs.move_to_end(key)
            return self._replay(known.graphs[key], request, kwargs, cache)

    def _first_run(self, key: tuple, kwargs: dict, cache: object) -> object:
        """An eager prefill; where it synchronises with the host, its signature stays eager."""
        if self.pool is None:
            return self._run(kwargs, cache)
        mode = torch.cuda.get_sync_debug_mode()  # the caller's, given back after
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                output = self._run(kwargs, cache)
            finally:
                torch.cuda.set_sync_debug_mode(mode)
        if any(SYNC_WARNING in str(warning.message) for warning in caught):
            self.known.eager.add(key)
        return output

    def _prepare(self, request: Request, kwargs: dict) -> _PrefillGraph:
        arguments = {name: value.clone() if torch.is_tensor(value) else value for name, value in kwargs.items()
                     if name not in CACHE_NAMES}  # fmt: skip
        prepared = _PrefillGraph(arguments, _RequestInputs.of(request).fixed())
        if self.pool is not None:
            self._record(prepared, request, captured=True)
        return prepared

    def _record(self, prepared: _PrefillGraph, request: Request, captured: bool) -> None:
        """Run the forward over the fixed arguments and inputs (captured into a graph, or eagerly): the hooks read
        the inputs through the request's state, and what they build inside is kept as the graph's."""
        own = _RequestInputs.of(request)
        prepared.inputs.put(request)
        prepared.cache = DynamicCache(config=self.language_model.config)
        try:

            def run() -> torch.Tensor:
                return self._run(prepared.arguments, prepared.cache).last_hidden_state

            if captured:
                prepared.graph, prepared.hidden = capture(run, self.pool)
            else:
                prepared.hidden = run()
            prepared.sets = {start: tokens for start, tokens in request.call.sets.items() if start > 0}
            prepared.scratch = request.prefill
        finally:
            own.put(request)

    def _replay(self, prepared: _PrefillGraph, request: Request, kwargs: dict, cache: object) -> object:
        for name, value in prepared.arguments.items():
            if torch.is_tensor(value):
                value.copy_(kwargs[name])
        prepared.inputs.copy_from(_RequestInputs.of(request))
        if prepared.graph is None:
            self._record(prepared, request, captured=False)
        else:
            prepared.graph.replay()
        for start, tokens in prepared.sets.items():
            request.call.sets[start] = _cloned(tokens)
        for index, layer in enumerate(prepared.cache.layers):
            cache.update(layer.keys, layer.values, index)
        return BaseModelOutputWithPast(last_hidden_state=prepared.hidden.clone(), **with_cache(cache))
