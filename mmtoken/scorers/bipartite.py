"""ToMe's bipartite soft matching, repeated until a row has as many tokens as it keeps."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mmtoken.ops import compress, gather_tokens, scatter_sum
from mmtoken.scorers.base import ScoreInput
from mmtoken.scorers.groups import Grouping, grouped_targets, pick_rows


def bipartite_targets(features: torch.Tensor, sizes: torch.Tensor, keep: int) -> torch.Tensor:
    """Merge targets (positions in each row of `features`, rows x n x dim) that leave `keep` tokens in every row, by
    rounds of bipartite soft matching (Bolya et al., arXiv 2210.09461): the tokens alive are split alternately into
    sets A and B, each A token finds its most cosine-similar B token, and the A tokens with the most similar partners
    merge into them, at most |A| per round. A merged token's features are the `sizes`-weighted mean of its members
    for the next round. All rows take their rounds at once."""
    rows, length, _ = features.shape
    target = torch.arange(length, device=features.device).repeat(rows, 1)
    if keep <= 0:
        return torch.full_like(target, -1)
    state, size = features.float().clone(), sizes.float().clone()
    alive, gone = target.clone(), torch.zeros_like(target, dtype=torch.bool)
    while alive.shape[1] > keep:
        first, second = alive[:, 0::2], alive[:, 1::2]
        unit = F.normalize(state, dim=-1)
        best, partner = (gather_tokens(unit, first) @ gather_tokens(unit, second).transpose(1, 2)).max(dim=2)
        merged = min(alive.shape[1] - keep, first.shape[1])
        merging = best.argsort(dim=1, descending=True, stable=True)[:, :merged]
        source, destination = first.gather(1, merging), second.gather(1, partner.gather(1, merging))
        moved = size.gather(1, source)
        addition = torch.cat([gather_tokens(state, source) * moved[..., None], moved[..., None]], -1)
        added = scatter_sum(addition, destination, length)  # the moved states, weighted, and their sizes
        total = size + added[..., -1]
        state, size = (state * size[..., None] + added[..., :-1]) / total[..., None], total
        target.scatter_(1, source, destination)
        staying = (~gone.scatter_(1, source, True).gather(1, alive)).int().argsort(dim=1, descending=True, stable=True)
        alive = alive.gather(1, staying[:, : alive.shape[1] - merged])
    return compress(target)


@dataclass
class BipartiteMerge(Grouping):
    """Each row's visual tokens merge by ToMe's bipartite soft matching on their states, weighted by their merge
    weights, until the row keeps its planned count (AIM, arXiv 2412.03248, does this to the projected features).
    Rows with as many tokens that keep as many match together."""

    def group(self, inputs: ScoreInput) -> torch.Tensor:
        def assign(rows: list[int], index: torch.Tensor) -> torch.Tensor:
            features = gather_tokens(pick_rows(inputs.hidden, rows), index)
            sizes = pick_rows(inputs.weight, rows).gather(1, index)
            return bipartite_targets(features, sizes, inputs.keep[rows[0]])

        return grouped_targets(inputs, assign)
