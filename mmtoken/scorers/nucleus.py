"""Per-row adaptive counts: the tokens that hold most of the attention, plus an even sample of the grid."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from mmtoken.scorers.attention import LastQueryAttention
from mmtoken.scorers.base import ScoreInput
from mmtoken.scorers.grid import coarse_to_fine


def top_share(scores: torch.Tensor, candidates: torch.Tensor, share: torch.Tensor) -> torch.Tensor:
    """Mask of the `share[row]` best-scored candidates of each row."""
    ranked = scores.float().masked_fill(~candidates, float("-inf"))
    rank = ranked.argsort(dim=1, descending=True, stable=True).argsort(dim=1)
    return candidates & (rank < share[:, None])


@dataclass
class AttentionNucleus:
    """Keeps, in each row, the fewest visual tokens that hold `mass` of the attention the last prompt token pays
    to the visual tokens (recomputed at the cut's layer, as PyramidDrop), and marks the rest -inf: a peaked
    distribution keeps few, a flat one many. On top, a `spatial` share of the row's visual tokens, spread evenly
    over the grid (`coarse_to_fine`), is always kept. The training-free form of ATP-LLaVA's instance-wise
    thresholds and its Spatial Augmented Pruning (arXiv 2412.00447)."""

    mass: float = 0.9
    spatial: float = 0.1
    layer_offset: int = 0
    decides_count: ClassVar[bool] = True

    def score(self, inputs: ScoreInput) -> torch.Tensor:
        attention = LastQueryAttention(layer_offset=self.layer_offset).score(inputs)
        weights = attention.masked_fill(~inputs.candidates, 0.0)
        weights = weights / weights.sum(1, keepdim=True).clamp(min=torch.finfo(weights.dtype).tiny)
        order = weights.argsort(dim=1, descending=True, stable=True)
        ordered = weights.gather(1, order)
        needed = torch.zeros_like(inputs.candidates).scatter(1, order, ordered.cumsum(1) - ordered < self.mass)
        scores = attention.masked_fill(~needed, float("-inf"))
        share = (inputs.candidates.sum(1) * self.spatial).round().long()
        return scores.masked_fill(top_share(coarse_to_fine(inputs.geometry), inputs.candidates, share), float("inf"))
