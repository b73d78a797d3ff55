"""Average pooling of the visual grid before the language model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mmtoken.methods.base import BEFORE_LLM, Examples, Method, check_budget
from mmtoken.methods.registry import register
from mmtoken.reducers import CellMean, GridCells, Reducer
from mmtoken.schedules import Cut
from mmtoken.scorers.base import Scorer
from mmtoken.scorers.cells import CellCorners


@register
@dataclass
class Pooling(Method):
    """`stride` x `stride` average pooling of each frame's patch grid (2 x 2 by default; the pooling baseline of
    Wen et al., arXiv 2502.11501). `budget` picks the stride whose token count is nearest. Each cell survives as
    one token at the position of its top-left patch."""

    name: ClassVar[str] = "pooling"
    paper: ClassVar[str] = "arXiv 2502.11501"
    stage: ClassVar[str] = BEFORE_LLM
    examples: ClassVar[Examples] = Examples(too_deep=None, cutting={"stride": 2}, keep_all={"stride": 1})
    stride: int | None = None
    budget: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.stride is not None and self.budget is not None:
            raise ValueError("pooling: give one of stride, budget")
        if self.stride is not None and self.stride < 1:
            raise ValueError(f"pooling: stride must be >= 1, got {self.stride}")
        if self.budget is not None:
            check_budget(self.budget)

    def named_layers(self, depth: int) -> tuple[int, ...]:
        return ()  # it cuts before the language model only

    def cuts(self, depth: int, visual: int) -> list[Cut]:
        GridCells(self.stride, self.budget).stride_for(visual)  # refuses a budget beyond this input, before any work
        return [Cut(0, visual)]  # every token stays a candidate: the scorer keeps one per cell

    @property
    def scorer(self) -> Scorer:
        return CellCorners(GridCells(self.stride, self.budget))

    @property
    def reducer(self) -> Reducer:
        return CellMean(GridCells(self.stride, self.budget))
