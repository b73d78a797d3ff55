"""Reducers: how the tokens that lose their place leave. Each maps the hidden states of a token set to those of
the kept subset, given as indices `local` (batch, width) into the set with `valid` marking the tokens truly kept
(the others only fill a row up to the batch's width), and returns the kept tokens' merge weights (how many
original tokens each one stands for)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from mmtoken.ops import GridCells, Reduced, gather_tokens, merge_into
from mmtoken.scorers.base import ScoreInput
from mmtoken.scorers.groups import Grouping


class Reducer(Protocol):
    def reduce(self, hidden: torch.Tensor, local: torch.Tensor, valid: torch.Tensor, inputs: ScoreInput) -> Reduced: ...


@dataclass
class Drop:
    """Cut tokens are simply removed."""

    def reduce(self, hidden: torch.Tensor, local: torch.Tensor, valid: torch.Tensor, inputs: ScoreInput) -> Reduced:
        return gather_tokens(hidden, local), inputs.weight.gather(1, local)


def _merge_and_gather(hidden: torch.Tensor, local: torch.Tensor, inputs: ScoreInput, target: torch.Tensor) -> Reduced:
    merged, weight = merge_into(hidden, inputs.weight * inputs.valid, target)
    return gather_tokens(merged, local), weight.gather(1, local)


@dataclass
class GroupMean:
    """Each kept token becomes the weighted mean of its group, as a `Grouping` assigned them (ToMe's size-weighted
    merge, arXiv 2210.09461)."""

    grouping: Grouping

    def reduce(self, hidden: torch.Tensor, local: torch.Tensor, valid: torch.Tensor, inputs: ScoreInput) -> Reduced:
        return _merge_and_gather(hidden, local, inputs, self.grouping.targets(inputs))


@dataclass
class NearestMerge:
    """Each visual token that loses its place merges into the kept visual token of its row whose state is most
    cosine-similar, weighted by merge weights (HoliTom's inner-LLM merge, arXiv 2505.21334)."""

    def reduce(self, hidden: torch.Tensor, local: torch.Tensor, valid: torch.Tensor, inputs: ScoreInput) -> Reduced:
        kept = torch.zeros_like(inputs.candidates).scatter_(1, local, valid) & inputs.candidates
        gone = inputs.candidates & ~kept
        unit = F.normalize(hidden.float(), dim=-1)
        similarity = (unit @ unit.transpose(1, 2)).masked_fill(~kept[:, None, :], float("-inf"))
        nearest = similarity.argmax(-1)
        own = torch.arange(hidden.shape[1], device=hidden.device).expand_as(nearest)
        target = torch.where(gone & kept.any(1, keepdim=True), nearest, own)
        return _merge_and_gather(hidden, local, inputs, target)


@dataclass
class CellMean:
    """Each kept token becomes the weighted mean of its grid cell (average pooling)."""

    cells: GridCells

    def reduce(self, hidden: torch.Tensor, local: torch.Tensor, valid: torch.Tensor, inputs: ScoreInput) -> Reduced:
        return _merge_and_gather(hidden, local, inputs, self.cells.firsts(inputs.geometry, inputs.candidates))
