"""Bi-level KV: the chunks of a video the question attends to keep their entries; the others are pooled."""

from __future__ import annotations

import torch

from mmtoken.kv.base import PressInput
from mmtoken.kv.snapkv import window_attention
from mmtoken.ops import scatter_sum


def frame_chunks(geometry: torch.Tensor, visual: torch.Tensor, frames: int) -> torch.Tensor:
    """(batch, n): the chunk of `frames` consecutive frames each visual entry belongs to (frames counted across the
    row's media in order), -1 for the other entries."""
    media, frame = geometry[..., 0], geometry[..., 1]
    key = media * (int(frame.max()) + 1) + frame
    previous = torch.cat([key.new_full((len(key), 1), -1), key[:, :-1]], 1)
    earlier_visual = torch.cat([visual.new_zeros(len(key), 1), visual[:, :-1]], 1)
    # an entry starts a frame where its frame differs from the visual entry before it (text between them is skipped)
    last_key = torch.where(earlier_visual, previous, -1).cummax(1).values  # frames increase along the prompt
    starts = visual & (key != last_key)
    number = starts.long().cumsum(1) - 1
    return torch.where(visual, number.clamp(min=0) // frames, -1)


def bilevel_groups(inputs: PressInput, chunk: torch.Tensor, top: int, pool: int) -> torch.Tensor:
    """(batch, n): the group of every entry, the entries of one group becoming one (their mean), -1 for entries
    that leave. Text entries and the visual entries of the `top` chunks the prompt's last queries attend to most
    are groups of their own; the other chunks' visual entries form groups of `pool` consecutive entries (pool 0:
    they leave). Group numbers follow the entries' order."""
    batch, length = chunk.shape
    chunks = int(chunk.max()) + 1
    if chunks == 0:  # no media: every valid entry stays
        return torch.where(inputs.valid, inputs.valid.long().cumsum(1) - 1, -1)
    attention = window_attention(inputs)
    relevance = scatter_sum(attention, chunk + 1, chunks + 1)
    relevance = relevance[:, 1:]
    dense = torch.zeros(batch, chunks, dtype=torch.bool, device=chunk.device)
    dense.scatter_(1, relevance.topk(min(top, chunks), dim=1).indices, True)
    own = (chunk < 0) | dense.gather(1, chunk.clamp(min=0))
    own &= inputs.valid
    sparse = inputs.valid & ~own
    if pool == 0:
        starts, member = own, own
    else:
        # within each sparse chunk, every `pool`-th entry starts a group: an entry's rank in its chunk is its count
        # of sparse entries so far less the count where its chunk begins (chunks follow each other along the row)
        counted = sparse.long().cumsum(1) - 1
        place = torch.where(sparse, chunk, chunks)  # others go to a spare column
        begins = torch.full((batch, chunks + 1), length, device=chunk.device).scatter_reduce(1, place, counted, "amin")
        rank = counted - begins.gather(1, place)
        starts = own | (sparse & (rank % pool == 0))
        member = own | sparse
    group = starts.long().cumsum(1) - 1
    return torch.where(member, group, -1)
