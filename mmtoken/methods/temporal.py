"""Temporal merging: near-identical tokens of adjacent video frames merge into their first occurrence."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mmtoken.methods.base import BEFORE_LLM, Examples, Method, check_budget, merge_cut
from mmtoken.methods.registry import register
from mmtoken.schedules import Cut
from mmtoken.scorers.temporal import TemporalMerge


@register
@dataclass
class Temporal(Method):
    """HoliTom's first stage as a method of its own (Shao et al., arXiv 2505.21334): before the language model, the
    frames of each video are segmented to remove the most tokens, and within a segment the tokens whose cosine
    similarity to their place's token in the next frame stays above `threshold` merge, size-weighted, into the
    segment's first frame (`TemporalMerge`). `budget` picks, per row, the highest threshold that leaves at most that
    many visual tokens. Video only; how many tokens stay depends on the video, and `handle.stats` reports it.
    Default threshold 0.8, the paper's.
    """

    name: ClassVar[str] = "temporal"
    paper: ClassVar[str] = "arXiv 2505.21334"
    stage: ClassVar[str] = BEFORE_LLM
    video_only: ClassVar[bool] = True
    examples: ClassVar[Examples] = Examples(too_deep=None, cutting={"threshold": 0.5}, keep_all={"threshold": 1.0})
    threshold: float | None = None
    budget: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.threshold is not None and self.budget is not None:
            raise ValueError("temporal: give one of threshold, budget")
        if self.threshold is not None and not -1 <= self.threshold <= 1:
            raise ValueError(f"temporal: threshold is a cosine similarity in [-1, 1], got {self.threshold}")
        if self.budget is not None:
            check_budget(self.budget)

    def named_layers(self, depth: int) -> tuple[int, ...]:
        return ()  # it cuts before the language model only

    def cuts(self, depth: int, visual: int) -> list[Cut]:
        if self.budget is not None and self.budget > visual:
            raise ValueError(f"temporal: budget {self.budget} exceeds the {visual} visual tokens of this input")
        threshold = 0.8 if self.threshold is None and self.budget is None else self.threshold
        # every token stays a candidate: the grouping decides how many stay
        return [merge_cut(0, visual, TemporalMerge(threshold, self.budget))]
