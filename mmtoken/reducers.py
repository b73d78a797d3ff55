"""Reducers: how the tokens that lose their place leave. Each maps the hidden states of a token set to those of
the kept subset, given as indices `local` (batch, width) into the set with `valid` marking the tokens truly kept
(the others only fill a row up to the batch's width), and returns the kept tokens' merge weights (how many
original tokens each one stands for)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from mmtoken.scorers.base import ScoreInput
from mmtoken.scorers.groups import Grouping

Reduced = tuple[torch.Tensor, torch.Tensor]  # the kept tokens' states and merge weights


class Reducer(Protocol):
    def reduce(self, hidden: torch.Tensor, local: torch.Tensor, valid: torch.Tensor, inputs: ScoreInput) -> Reduced: ...


def gather_tokens(hidden: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    return hidden.gather(1, local[..., None].expand(-1, -1, hidden.shape[-1]))


def merge_into(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor) -> Reduced:
    """Every token whose `target` (batch, n) is itself becomes the weighted mean of the tokens that name it,
    weighted by `weight` (batch, n; 0 for tokens that count for nothing); a target of -1 merges nowhere.

    Returns the new states and weights of all n tokens (those of tokens that merged away are left as they were).
    A token that absorbs nothing keeps its state bit for bit.
    """
    own = torch.arange(target.shape[1], device=target.device).expand_as(target)
    target = torch.where(target < 0, own, target)
    weight = weight.to(torch.float32)
    sums = torch.zeros_like(hidden, dtype=torch.float32).scatter_add_(
        1, target[..., None].expand(-1, -1, hidden.shape[-1]), hidden.float() * weight[..., None]
    )
    totals = torch.zeros_like(weight).scatter_add_(1, target, weight)
    members = torch.zeros_like(weight).scatter_add_(1, target, torch.ones_like(weight))
    merged = (sums / totals.clamp(min=torch.finfo(torch.float32).tiny)[..., None]).to(hidden.dtype)
    absorbed = (members > 1) & (totals > 0)
    return torch.where(absorbed[..., None], merged, hidden), torch.where(members > 0, totals, weight)


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
class GridCells:
    """Square cells of `stride` x `stride` patches within each frame; with `budget` instead, the stride whose
    cell count is nearest to it. Tokens off the grid (text, row separators) are cells of their own."""

    stride: int | None = None
    budget: float | None = None

    def stride_for(self, visual: int) -> int:
        if self.budget is None:
            return self.stride or 2
        if self.budget > visual:
            raise ValueError(f"pooling: budget {self.budget} exceeds the {visual} visual tokens of this input")
        return max(1, round(math.sqrt(visual / self.budget)))

    def of_row(self, geometry: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """Cell id of every token of one row; `geometry` is (n, 4) as in `ScoreInput`."""
        stride = self.stride_for(int(candidates.sum()))
        media, frame, row, column = geometry.clamp(min=0).unbind(-1)
        row, column = row // stride, column // stride
        cell = ((media * (frame.max() + 1) + frame) * (row.max() + 1) + row) * (column.max() + 1) + column
        own = torch.arange(len(cell), device=cell.device) + cell.max() + 1
        return torch.where(candidates & (geometry[:, 3] >= 0), cell, own)

    def firsts(self, inputs: ScoreInput) -> torch.Tensor:
        """(batch, n): the index of the first token of each token's cell."""
        first = torch.empty(inputs.candidates.shape, dtype=torch.long, device=inputs.candidates.device)
        for row in range(first.shape[0]):
            _, members = self.of_row(inputs.geometry[row], inputs.candidates[row]).unique(return_inverse=True)
            index = torch.arange(len(members), device=members.device)
            heads = torch.full_like(index, len(members)).scatter_reduce(0, members, index, reduce="amin")
            first[row] = heads[members]
        return first


@dataclass
class CellMean:
    """Each kept token becomes the weighted mean of its grid cell (average pooling)."""

    cells: GridCells

    def reduce(self, hidden: torch.Tensor, local: torch.Tensor, valid: torch.Tensor, inputs: ScoreInput) -> Reduced:
        return _merge_and_gather(hidden, local, inputs, self.cells.firsts(inputs))
