"""DivPrune: the max-min diverse subset of the visual tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mmtoken.methods.base import BEFORE_LLM, Baseline, Examples
from mmtoken.methods.registry import register
from mmtoken.scorers import Scorer
from mmtoken.scorers.diversity import MaxMinDiversity


@register
@dataclass
class DivPrune(Baseline):
    """DivPrune (Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models",
    arXiv 2503.02175).

    Keeps the visual tokens that greedily solve the max-min diversity problem on the cosine distance of the projected
    features, before the language model (or at `layer`, on its hidden states). Default ratio 0.098, the paper's.
    """

    name: ClassVar[str] = "divprune"
    paper: ClassVar[str] = "arXiv 2503.02175"
    stage: ClassVar[str] = BEFORE_LLM
    examples: ClassVar[Examples] = Examples(too_deep={"layer": 6}, cutting={"ratio": 0.3}, keep_all={"ratio": 1.0})
    default_ratio: ClassVar[float] = 0.098

    @property
    def scorer(self) -> Scorer:
        return MaxMinDiversity()
