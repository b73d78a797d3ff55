"""Random scores: the floor every method must beat."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from mmtoken.scorers.base import ScoreInput


@dataclass
class RandomScore:
    """Uniform random scores, drawn per batch row from `seed` so a row scores the same alone or in a batch.

    The random-subset baseline of Wen et al., "Token Pruning in MLLMs: Are We Solving the Right Problem?"
    (arXiv 2502.11501).
    """

    seed: int = 0
    layer_offset: int | None = None

    def score(self, inputs: ScoreInput) -> torch.Tensor:
        candidates = inputs.candidates
        draws = uniform_draws(self.seed, 1 << max(candidates.shape[1] - 1, 0).bit_length(), candidates.device)
        rank = (candidates.long().cumsum(1) - 1).clamp(min=0)  # the k-th candidate of a row gets the k-th draw
        return torch.where(candidates, draws[rank], 0.0)


@functools.cache
def uniform_draws(seed: int, length: int, device: torch.device) -> torch.Tensor:
    """`length` uniform draws from `seed`, kept on `device` so a cut never waits for a copy from the host. A longer
    draw from the same seed starts with the same values, so a row's scores do not depend on the batch's length."""
    return torch.rand(length, generator=torch.Generator().manual_seed(seed)).to(device)
