"""ToMe's bipartite soft matching, repeated until a row has as many tokens as it keeps."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mmtoken.ops import compress
from mmtoken.scorers.base import ScoreInput
from mmtoken.scorers.groups import Grouping, row_targets


def bipartite_targets(features: torch.Tensor, sizes: torch.Tensor, keep: int) -> torch.Tensor:
    """Merge targets (positions in `features`, n x dim) that leave `keep` tokens, by rounds of bipartite soft
    matching (Bolya et al., arXiv 2210.09461): the tokens alive are split alternately into sets A and B, each A token
    finds its most cosine-similar B token, and the A tokens with the most similar partners merge into them, at most
    |A| per round. A merged token's features are the `sizes`-weighted mean of its members for the next round."""
    length = len(features)
    target = torch.arange(length, device=features.device)
    if keep <= 0:
        return torch.full_like(target, -1)
    state, size = features.float().clone(), sizes.float().clone()
    alive, gone = target.clone(), torch.zeros(length, dtype=torch.bool, device=features.device)
    while len(alive) > keep:
        first, second = alive[0::2], alive[1::2]
        unit = F.normalize(state, dim=-1)
        best, partner = (unit[first] @ unit[second].T).max(dim=1)
        merged = min(len(alive) - keep, len(first))
        merging = best.argsort(descending=True, stable=True)[:merged]
        source, destination = first[merging], second[partner[merging]]
        total = size.index_add(0, destination, size[source])
        weighted = (state * size[:, None]).index_add(0, destination, state[source] * size[source, None])
        state, size = weighted / total[:, None], total
        target[source] = destination
        staying = (~gone.index_fill_(0, source, True)[alive]).int().argsort(descending=True, stable=True)
        alive = alive[staying[: len(alive) - merged]]
    return compress(target)


@dataclass
class BipartiteMerge(Grouping):
    """Each row's visual tokens merge by ToMe's bipartite soft matching on their states, weighted by their merge
    weights, until the row keeps its planned count (AIM, arXiv 2412.03248, does this to the projected features)."""

    def group(self, inputs: ScoreInput) -> torch.Tensor:
        def assign(row: int, index: torch.Tensor) -> torch.Tensor:
            return bipartite_targets(inputs.hidden[row, index], inputs.weight[row, index], inputs.keep[row])

        return row_targets(inputs, assign)
