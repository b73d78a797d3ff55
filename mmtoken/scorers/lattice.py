"""A scorer with a regular lattice of the grid always kept on top of what it picks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from mmtoken.scorers.base import ScoreInput, Scorer


@dataclass
class PlusLattice:
    """The scores of `base`, with every visual token on the `stride` x `stride` lattice of its frame (row and
    column multiples of `stride`) kept on top of the planned count: FEATHER's uniform sampling (arXiv 2412.13180),
    so that no region of the image is left without tokens."""

    base: Scorer
    stride: int = 3
    decides_count: ClassVar[bool] = True

    @property
    def layer_offset(self) -> int | None:
        return self.base.layer_offset

    def score(self, inputs: ScoreInput) -> torch.Tensor:
        row, column = inputs.geometry[..., 2], inputs.geometry[..., 3]
        on_lattice = (row % self.stride == 0) & (column % self.stride == 0) & (column >= 0) & inputs.candidates
        return self.base.score(inputs).float().masked_fill(on_lattice, float("inf"))
