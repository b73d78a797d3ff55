"""DivPrune's max-min diverse subset of the visual tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mmtoken.kernels.max_min import greedy_order
from mmtoken.scorers.base import ScoreInput


def max_min_order(features: torch.Tensor, candidates: torch.Tensor, count: int) -> torch.Tensor:
    """The first `count` candidates of each row of `features` (batch, n, dim; `candidates` batch, n) in greedy
    max-min order under cosine distance: first the candidate farthest from its nearest neighbour, then each time the
    candidate farthest from all those picked so far (`mmtoken.kernels.max_min`). Returns (batch, count) indices, -1
    where a row has run out of candidates. Every row takes its steps at once on the device, with no wait on the host."""
    length = candidates.shape[1]
    unit = F.normalize(features.float(), dim=-1)
    distance = 1 - unit @ unit.transpose(1, 2)
    own = torch.eye(length, dtype=torch.bool, device=features.device)
    others = distance.masked_fill(own | ~candidates[:, None, :], float("inf"))
    isolation = others.amin(2).masked_fill(~candidates, float("-inf"))  # +inf for a row's only candidate
    first = isolation.argmax(1, keepdim=True)
    return greedy_order(distance, candidates, first, count)


@dataclass
class MaxMinDiversity:
    """Keeps the max-min diverse subset of each row's visual tokens, by cosine distance of their states (DivPrune,
    arXiv 2503.02175: the greedy solution of the max-min diversity problem, no attention needed)."""

    layer_offset: int | None = None

    def score(self, inputs: ScoreInput) -> torch.Tensor:
        order = max_min_order(inputs.hidden, inputs.candidates, max(inputs.keep, default=0))
        rank = torch.arange(order.shape[1], 0, -1, device=order.device, dtype=torch.float32).expand_as(order)
        scores = torch.zeros(inputs.candidates.shape[0], inputs.candidates.shape[1] + 1, device=order.device)
        return scores.scatter_(1, torch.where(order >= 0, order, scores.shape[1] - 1), rank)[:, :-1]
