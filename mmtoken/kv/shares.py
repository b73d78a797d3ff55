"""Chunk shares: a press's scores rearranged so that every chunk of a streaming prefill keeps an equal share of the
capacity, its own best entries first, instead of the best entries over all chunks.

In a streaming prefill the queries that score the cache are the latest chunk's (the question has not come yet), and
they attend most to the entries near them, so pressing after each chunk by those scores alone keeps ever fewer
entries of the earlier frames, as a recency press would. Taken in turns, the first pick of every chunk comes
before the second pick of any, so `select`'s top entries spread over the chunks.
"""

from __future__ import annotations

import torch


def in_turns(scores: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """(batch, n) scores under which the entries of every group (`groups`; the entries of none, -1, such as text
    where a press also takes it, take turns as one group of their own) come in turns: each entry
    scores minus its rank within its group by `scores` (0 the best), plus less than one by its own score to order
    entries of equal rank. Entries scored +inf (they must stay, so one of them is its group's first) or -inf keep
    their score."""
    batch, length = scores.shape
    by_score = scores.argsort(dim=1, descending=True, stable=True)
    order = by_score.gather(1, groups.gather(1, by_score).argsort(dim=1, stable=True))  # by group, then by score
    grouped = groups.gather(1, order)
    index = torch.arange(length, device=scores.device).expand(batch, -1)
    starts = torch.ones_like(grouped, dtype=torch.bool)
    starts[:, 1:] = grouped[:, 1:] != grouped[:, :-1]
    rank_in_order = index - torch.where(starts, index, 0).cummax(1).values
    rank = torch.empty_like(rank_in_order).scatter_(1, order, rank_in_order)
    finite = scores.masked_fill(scores.isinf(), 0)
    low, high = finite.min(1, keepdim=True).values, finite.max(1, keepdim=True).values
    tie_break = 0.5 * (finite - low) / (high - low).clamp(min=torch.finfo(finite.dtype).tiny)
    return torch.where(scores.isinf(), scores, tie_break - rank)
