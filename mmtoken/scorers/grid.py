"""A spatially even sample of the visual grid, for any number of tokens kept."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmtoken.scorers.base import ScoreInput

_LEVELS = 16
_R2 = (0.7548776662466927, 0.5698402909980532)  # the R2 low-discrepancy sequence's constants


def coarse_to_fine(geometry: torch.Tensor) -> torch.Tensor:
    """Score grid cells so that every top-k is spread evenly: first the cells on the coarsest lattice
    (frame, row and column all multiples of a large power of two), then each finer lattice; cells of one
    lattice are ordered by the R2 sequence so that a partial lattice is spread too."""
    frame, row, column = geometry[..., 1], geometry[..., 2], geometry[..., 3]
    bits = (frame | row | column).clamp(min=0)
    level = sum(((bits % (2 << j)) == 0).long() for j in range(_LEVELS))
    spread = torch.frac(row * _R2[0] + column * _R2[1] + frame * 0.5)
    return (level.float() + spread).masked_fill(column < 0, -1.0)


@dataclass
class UniformGrid:
    """Keeps an evenly spaced lattice of the visual grid (the uniform-sampling baseline; FEATHER, arXiv
    2412.13180, unites it with attention scores)."""

    layer_offset: int | None = None

    def score(self, inputs: ScoreInput) -> torch.Tensor:
        return coarse_to_fine(inputs.geometry)
