"""One token per grid cell: the cell's first (top-left) token."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from mmtoken.reducers import GridCells
from mmtoken.scorers.base import ScoreInput


@dataclass
class CellCorners:
    """Scores 0 for the first token of each grid cell and -inf for the rest, so a cut keeps one per cell."""

    cells: GridCells
    layer_offset: int | None = None
    discards: ClassVar[bool] = True

    def score(self, inputs: ScoreInput) -> torch.Tensor:
        scores = torch.full(inputs.candidates.shape, float("-inf"), device=inputs.candidates.device)
        for row in range(scores.shape[0]):
            cells, members = self.cells.of_row(inputs.geometry[row], inputs.candidates[row]).unique(return_inverse=True)
            first = torch.full_like(cells, len(members)).scatter_reduce(
                0, members, torch.arange(len(members), device=members.device), reduce="amin"
            )
            scores[row, first] = 0.0
        return scores
