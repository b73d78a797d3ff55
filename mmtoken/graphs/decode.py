"""Decode steps over fixed caches: after a patched prefill, the request's KV cache becomes a `FixedCache` (the
pruned sizes of each layer, plus room), and each one-token step of the language model runs over it, replayed from
a CUDA graph captured once per decode signature (or, with `capture=False`, run eagerly over the same buffers, which
the CPU tests compare with the dynamic cache).

Buffers and their graph are leased per request from a pool keyed by signature, and given back when the request's
cache is garbage-collected, so sequential requests of nearby sizes replay one graph and concurrent ones get their
own. A cache that fills up moves to a larger lease (one more capture). The pool belongs to the language model and
outlives a patch: a graph reads only the fixed buffers, so one captured under one method serves every other.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import nn
from transformers import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast

from mmtoken.compat import cache_in, cache_of, replace_cache, with_cache
from mmtoken.engine.attending import attention_in
from mmtoken.engine.request import give_to, request_of
from mmtoken.graphs.attention import FIXED_CACHE
from mmtoken.graphs.cache import FixedBuffers, FixedCache, Lease, groups_of, signature
from mmtoken.graphs.capture import capture, warm_up

Forward = Callable[[torch.Tensor, torch.Tensor, Cache], torch.Tensor]
_POOLS: weakref.WeakKeyDictionary[nn.Module, dict[tuple, list[DecodeStep]]] = weakref.WeakKeyDictionary()


class DecodeStep:
    """One lease: fixed buffers and, once captured, the CUDA graph of a one-token step over them with its static
    inputs (embeddings, positions) and output (the last hidden state)."""

    def __init__(self, buffers: FixedBuffers) -> None:
        self.buffers = buffers
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: tuple[torch.Tensor, torch.Tensor] | None = None
        self.output: torch.Tensor | None = None

    def run(self, forward: Forward, embeds: torch.Tensor, positions: torch.Tensor, cache: Cache, pool) -> torch.Tensor:
        if pool is None:
            self.buffers.begin_step()
            return forward(embeds, positions, cache)
        if self.graph is None or self.inputs[1].shape != positions.shape:
            self._capture(forward, embeds, positions, cache, pool)
        self.inputs[0].copy_(embeds)
        self.inputs[1].copy_(positions)
        self.graph.replay()
        return self.output

    def _capture(self, forward: Forward, embeds: torch.Tensor, positions: torch.Tensor, cache: Cache, pool) -> None:
        self.inputs = (embeds.clone(), positions.clone())
        counters = [layer.filled.clone() for layer in self.buffers.layers]

        def step() -> torch.Tensor:
            self.buffers.begin_step()
            return forward(*self.inputs, cache)

        warm_up(step)  # its write into the cache is made again by the replay
        for layer, counter in zip(self.buffers.layers, counters, strict=True):
            layer.filled.copy_(counter)
        self.graph, self.output = capture(step, pool)


class DecodeGraphs:
    """Turns each prefill's KV cache into a `FixedCache` and runs the language model's one-token decode steps over
    it: replayed from CUDA graphs with `capture`, eagerly over the same fixed buffers without."""

    def __init__(self, model: nn.Module, language_model: nn.Module, capture: bool) -> None:
        self.model, self.language_model = model, language_model
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self._original = type(language_model).forward.__get__(language_model)
        self._free = _POOLS.setdefault(language_model, {})
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def attach(self) -> None:
        self._handles = [self.model.register_forward_hook(self._after_call, with_kwargs=True)]
        self.language_model.forward = self._forward

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        del self.language_model.forward

    def _lease(self, key: tuple, like: list[tuple[torch.Tensor, torch.Tensor]], groups: list[int]) -> DecodeStep:
        free = self._free.setdefault(key, [])
        if free:
            return free.pop()
        return DecodeStep(FixedBuffers(like, list(key[1]), groups, self.language_model.config._attn_implementation))

    def _give_back(self, lease: Lease) -> None:
        self._free[lease.key].append(lease.step)

    def _after_call(self, module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        cache = cache_of(output)
        request = request_of(cache)
        if isinstance(cache, FixedCache) or request is None or request.records is None:
            return
        entries = [(layer.keys, layer.values) for layer in cache.layers]
        groups = groups_of(request.records)
        key = signature(entries, groups)
        step = self._lease(key, entries, groups)
        step.buffers.fill(entries, {group: request.records[group].valid for group in set(groups)})
        fixed = FixedCache(Lease(step, key))
        weakref.finalize(fixed, self._give_back, fixed.lease)
        give_to(fixed, request)
        request.step_masks = step.buffers.step_mask
        replace_cache(output, fixed)

    def _grow(self, cache: FixedCache) -> DecodeStep:
        old = cache.lease.step, cache.lease.key
        entries, _ = cache.buffers.held()
        key = signature(entries, list(old[1][2]), extra=1)
        step = self._lease(key, entries, list(key[2]))
        cache.move_to(step, key)
        request_of(cache).step_masks = step.buffers.step_mask
        self._free[old[1]].append(old[0])
        return step

    def _step_forward(self, embeds: torch.Tensor, positions: torch.Tensor | None, cache: Cache) -> torch.Tensor:
        with attention_in(self.language_model.config, FIXED_CACHE):
            out = self._original(inputs_embeds=embeds, position_ids=positions, attention_mask=None, use_cache=True,
                                 **with_cache(cache))  # fmt: skip
        return out.last_hidden_state

    def _forward(self, *args, **kwargs) -> object:
        cache = cache_in(kwargs)
        if not isinstance(cache, FixedCache):
            return self._original(*args, **kwargs)
        embeds, positions = kwargs["inputs_embeds"], kwargs.get("position_ids")
        step = self._grow(cache) if cache.buffers.full() else cache.lease.step
        pool = self.pool if positions is not None else None  # without positions, the model's own defaults, eagerly
        hidden = step.run(self._step_forward, embeds, positions, cache, pool)
        cache.buffers.advance()
        return BaseModelOutputWithPast(last_hidden_state=hidden, **with_cache(cache))
