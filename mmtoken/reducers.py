"""Reducers: how the tokens that lose their place leave. Each maps the hidden states of a token set to those of
the kept subset, given as indices `local` (batch, kept) into the set."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

from mmtoken.scorers.base import ScoreInput


class Reducer(Protocol):
    def reduce(self, hidden: torch.Tensor, local: torch.Tensor, inputs: ScoreInput) -> torch.Tensor: ...


def gather_tokens(hidden: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    return hidden.gather(1, local[..., None].expand(-1, -1, hidden.shape[-1]))


@dataclass
class Drop:
    """Cut tokens are simply removed."""

    def reduce(self, hidden: torch.Tensor, local: torch.Tensor, inputs: ScoreInput) -> torch.Tensor:
        return gather_tokens(hidden, local)


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


@dataclass
class CellMean:
    """Each kept token becomes the mean of its grid cell (average pooling)."""

    cells: GridCells

    def reduce(self, hidden: torch.Tensor, local: torch.Tensor, inputs: ScoreInput) -> torch.Tensor:
        pooled = torch.empty_like(hidden)
        for row in range(hidden.shape[0]):
            _, members = self.cells.of_row(inputs.geometry[row], inputs.candidates[row]).unique(return_inverse=True)
            weight = inputs.valid[row].to(hidden.dtype)[:, None]
            sums = torch.zeros_like(hidden[row]).index_add_(0, members, hidden[row] * weight)
            counts = torch.zeros_like(weight).index_add_(0, members, weight).clamp(min=1)
            pooled[row] = (sums / counts)[members]
        return gather_tokens(pooled, local)
