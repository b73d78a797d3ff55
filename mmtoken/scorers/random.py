"""Random scores: the floor every method must beat."""

from __future__ import annotations

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
        scores = torch.zeros(inputs.candidates.shape, device=inputs.candidates.device)
        for row, candidates in enumerate(inputs.candidates):
            index = candidates.nonzero().squeeze(1)
            generator = torch.Generator().manual_seed(self.seed)
            scores[row, index] = torch.rand(len(index), generator=generator).to(scores.device)
        return scores
