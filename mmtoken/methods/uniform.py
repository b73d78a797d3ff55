"""Uniform grid pruning: a spatially even sample of the visual tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mmtoken.methods.base import BEFORE_LLM, Baseline, Examples
from mmtoken.methods.registry import register
from mmtoken.scorers import Scorer, UniformGrid


@register
@dataclass
class UniformPrune(Baseline):
    """Keeps an evenly spaced lattice of the visual grid, the sampling FEATHER (arXiv 2412.13180) adds to
    attention ranking so that no region is left without tokens."""

    name: ClassVar[str] = "uniform"
    paper: ClassVar[str] = "arXiv 2412.13180"
    stage: ClassVar[str] = BEFORE_LLM
    examples: ClassVar[Examples] = Examples(too_deep={"layer": 6}, cutting={"ratio": 0.3}, keep_all={"ratio": 1.0})

    @property
    def scorer(self) -> Scorer:
        return UniformGrid()
