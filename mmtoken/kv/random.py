"""Random entries: the floor every press must beat."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmtoken.kv.base import PressInput
from mmtoken.scorers.random import uniform_draws


@dataclass
class RandomEntries:
    """Uniform random scores from `seed`: the k-th valid entry of every row gets the k-th draw, so a row scores the
    same alone or in a padded batch."""

    seed: int = 0
    window: int = 0

    def score(self, inputs: PressInput) -> torch.Tensor:
        length = inputs.valid.shape[1]
        draws = uniform_draws(self.seed, 1 << max(length - 1, 0).bit_length(), inputs.valid.device)
        return draws[(inputs.valid.long().cumsum(1) - 1).clamp(min=0)]
