"""Eviction while decoding (H2O): before each decode step, a layer's cache that would pass its capacity keeps its
latest entries and the entries that received the most attention so far, and frees the others."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Cache

from mmtoken.engine.record import gather_entries
from mmtoken.engine.request import Request
from mmtoken.engine.select import select
from mmtoken.kernels.query_scores import query_scores
from mmtoken.methods.h2o import H2O
from mmtoken.scorers.attention import rotated_queries


def evict_before_step(request: Request, cache: Cache, index: int, layer: nn.Module, hidden: torch.Tensor,
                      kwargs: dict, step: H2O) -> None:  # fmt: skip
    """Add this step's attention to decoder layer `index`'s running sums, and evict down to the capacity less the
    entry the step adds."""
    entries, record = cache.layers[index], request.records[index]
    held_entries = entries.keys.shape[2]
    valid = record.entries_valid()[:, :held_entries]  # the record counts this step's entry already, the cache not yet
    cos, sin = kwargs["position_embeddings"]
    query = rotated_queries(layer, hidden, cos, sin)[:, :, -1]
    attention = query_scores(query, entries.keys.transpose(1, 2), None, None, valid, layer.self_attn.scaling)
    held = request.attention_sums.get(index)
    sums = attention if held is None else F.pad(held, (0, attention.shape[1] - held.shape[1])) + attention
    if held_entries >= step.capacity:
        length = sums.shape[1]
        recent = torch.arange(length, device=sums.device) >= length - step.recent
        ranked = sums.masked_fill(recent, float("inf"))  # the latest stay on top of the count
        keep = torch.full((len(sums),), step.capacity - 1 - step.recent, device=sums.device)
        local, kept = select(ranked, valid, valid, keep)
        gather_entries(cache, index, local)
        new = torch.full((len(local), 1), held_entries, device=local.device)  # this step's entry, still to come
        request.records[index] = record.gathered(
            torch.cat([local, new], 1), torch.cat([~kept, torch.zeros_like(kept[:, :1])], 1)
        )
        sums = sums.gather(1, local)
    request.attention_sums[index] = sums
