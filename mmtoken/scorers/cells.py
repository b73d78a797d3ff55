"""One token per grid cell: the cell's first (top-left) token."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from mmtoken.ops import GridCells
from mmtoken.scorers.base import ScoreInput


@dataclass
class CellCorners:
    """Scores 0 for the first token of each grid cell and -inf for the rest, so a cut keeps one per cell."""

    cells: GridCells
    layer_offset: int | None = None
    decides_count: ClassVar[bool] = True

    def score(self, inputs: ScoreInput) -> torch.Tensor:
        first = self.cells.firsts(inputs.geometry, inputs.candidates)
        own = torch.arange(first.shape[1], device=first.device)
        return torch.where(first == own, 0.0, float("-inf"))
