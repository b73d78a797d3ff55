"""DivPrune's max-min diverse subset of the visual tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mmtoken.scorers.base import ScoreInput


def max_min_order(features: torch.Tensor, count: int) -> torch.Tensor:
    """The first `count` rows of `features` (n, dim) in greedy max-min order under cosine distance: first the row
    farthest from its nearest neighbour, then each time the row farthest from all rows picked so far."""
    count = min(count, len(features))
    if count == 0:
        return torch.zeros(0, dtype=torch.long, device=features.device)
    unit = F.normalize(features.float(), dim=-1)
    distance = 1 - unit @ unit.T
    own = torch.eye(len(features), dtype=torch.bool, device=features.device)
    isolation = distance.masked_fill(own, float("inf")).amin(1) if len(features) > 1 else distance[0]
    picked = [int(isolation.argmax())]
    closest = distance[picked[0]].clone()
    for _ in range(count - 1):
        closest[picked[-1]] = float("-inf")  # stays -inf through every later minimum
        picked.append(int(closest.argmax()))
        closest = torch.minimum(closest, distance[picked[-1]])
    return torch.tensor(picked, device=features.device)


@dataclass
class MaxMinDiversity:
    """Keeps the max-min diverse subset of each row's visual tokens, by cosine distance of their states (DivPrune,
    arXiv 2503.02175: the greedy solution of the max-min diversity problem, no attention needed)."""

    layer_offset: int | None = None

    def score(self, inputs: ScoreInput) -> torch.Tensor:
        scores = torch.zeros(inputs.candidates.shape, device=inputs.candidates.device)
        for row, count in enumerate(inputs.keep):
            index = inputs.candidates[row].nonzero().squeeze(1)
            order = max_min_order(inputs.hidden[row, index], count)
            scores[row, index[order]] = torch.arange(len(order), 0, -1, device=scores.device, dtype=scores.dtype)
        return scores
