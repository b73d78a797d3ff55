"""Random pruning: the floor every method must beat."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mmtoken.methods.base import BEFORE_LLM, Baseline, Examples
from mmtoken.methods.registry import register
from mmtoken.scorers import RandomScore, Scorer


@register
@dataclass
class RandomPrune(Baseline):
    """Keeps a random subset of the visual tokens (Wen et al., arXiv 2502.11501, show it is a strong floor)."""

    name: ClassVar[str] = "random"
    paper: ClassVar[str] = "arXiv 2502.11501"
    stage: ClassVar[str] = BEFORE_LLM
    examples: ClassVar[Examples] = Examples(too_deep={"layer": 6}, cutting={"ratio": 0.3}, keep_all={"ratio": 1.0})
    seed: int = 0

    @property
    def scorer(self) -> Scorer:
        return RandomScore(seed=self.seed)
