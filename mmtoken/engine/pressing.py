"""Pressing the KV cache once the prefill is done: each `on_cache` step scores every decoder layer's entries, keeps
its share of each row's, and frees the others (`compact`)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import Cache

from mmtoken.engine.request import PrefillScratch, Request, compact, pool
from mmtoken.engine.select import select
from mmtoken.kv import PressInput
from mmtoken.kv.bilevel import bilevel_groups, frame_chunks
from mmtoken.kv.shares import in_turns
from mmtoken.methods.base import CachePress, Method
from mmtoken.methods.bilevel import BiLevel
from mmtoken.scorers.attention import rotated_queries
from mmtoken.state import TEXT


def press_cache(request: Request, cache: Cache, scratch: PrefillScratch, layers: nn.ModuleList,
                steps: list[Method]) -> None:  # fmt: skip
    """Apply every `on_cache` step of `steps`, in order, to `cache`, which `request`'s prefill just filled."""
    for step in steps:
        if isinstance(step, CachePress) and step.chunk_frames is None:  # a streaming press pressed after each chunk
            for index, layer in enumerate(layers):
                press_layer(request, cache, index, layer, step, scratch.windows.get(index))


def press_layer(request: Request, cache: Cache, index: int, layer: nn.Module, step: CachePress,
                window: tuple[torch.Tensor, tuple] | None) -> None:  # fmt: skip
    """Keep the entries of decoder layer `index`'s cache that `step`'s press scores best, its share of each row's
    candidates (`window`: the layer's inputs of the prompt's last tokens and their rotary tables, for presses that
    read their queries); for bi-level KV, pool the chunks that are not kept dense."""
    entries, record, received = cache.layers[index], request.records[index], request.call.sets[0]
    valid = record.entries_valid()
    positions = received.position.gather(1, record.entry_slots())
    visual = (request.call.kinds.gather(1, positions) != TEXT) & valid
    queries = None
    if step.press.window:
        hidden, (cos, sin) = window
        queries = rotated_queries(layer, hidden, cos, sin)
    geometry = request.call.geometry.gather(1, positions[..., None].expand(-1, -1, 4))
    inputs = PressInput(entries.keys, entries.values, valid, visual, queries, layer.self_attn.scaling, geometry)
    if isinstance(step, BiLevel):
        chunk = frame_chunks(geometry, visual, step.chunk)
        pool(cache, index, bilevel_groups(inputs, chunk, step.top, step.pool))
        return
    candidates = visual if step.visual_only else valid
    keep = step.kept(candidates.sum(1))
    scores = step.press.score(inputs)
    if step.chunk_shares:
        scores = in_turns(scores, frame_chunks(geometry, visual, step.chunk_frames))
    local, kept = select(scores, candidates, valid, keep)
    compact(cache, index, local, ~kept)
