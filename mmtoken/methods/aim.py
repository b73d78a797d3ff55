"""AIM: token merging before the language model, then progressive pruning inside it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from mmtoken.methods.base import BEFORE_AND_AT_LAYER, Examples, Method, check_ratio_or_budget, merge_cut
from mmtoken.methods.registry import register
from mmtoken.schedules import Cut, average_visual_tokens
from mmtoken.scorers import Scorer
from mmtoken.scorers.bipartite import BipartiteMerge
from mmtoken.scorers.pagerank import TextRank


@register
@dataclass
class AIM(Method):
    """AIM (Zhong et al., "AIM: Adaptive Inference of Multi-Modal LLMs via Token Merging and Pruning",
    arXiv 2412.03248).

    Before the language model, ToMe's bipartite soft matching merges each row's visual tokens down to `ratio` of
    them. From decoder layer `layer` on, each layer keeps `step` fewer of the merged tokens than the one before, ranked
    by PageRank over the text's attention at the layer before (`TextRank`), until none is left. `budget` (average
    visual tokens per layer) solves for the ratio instead; step 0 merges only. Defaults: ratio 0.25 (two rounds of
    halving), step 0.125, and `layer` the middle of the stack (the paper starts after layer 13 of 32 and 14 of 28).
    """

    name: ClassVar[str] = "aim"
    paper: ClassVar[str] = "arXiv 2412.03248"
    stage: ClassVar[str] = BEFORE_AND_AT_LAYER
    examples: ClassVar[Examples] = Examples(
        too_deep={"layer": 6}, cutting={"ratio": 0.5, "layer": 2, "step": 0.5}, keep_all={"ratio": 1.0, "step": 0}
    )
    ratio: float | None = None
    budget: float | None = None
    layer: int | None = None
    step: float = 0.125

    def __post_init__(self) -> None:
        super().__post_init__()
        check_ratio_or_budget("aim", self.ratio, self.budget)
        if self.layer is not None and self.layer < 1:
            raise ValueError(f"aim: layer must be >= 1 (the layer before it ranks the tokens), got {self.layer}")
        if not 0 <= self.step <= 1:
            raise ValueError(f"aim: step must be in [0, 1], got {self.step}")

    def _start(self, depth: int) -> int:
        return depth // 2 if self.layer is None else self.layer

    def named_layers(self, depth: int) -> tuple[int, ...]:
        return (self._start(depth),)

    def _pruning(self, depth: int, merged: float) -> list[Cut]:
        start = self._start(depth)
        stages = range(math.ceil(1 / self.step) if self.step else 0)
        return [Cut(start + j, merged * max(0.0, 1 - (j + 1) * self.step)) for j in stages if start + j < depth]

    def cuts(self, depth: int, visual: int) -> list[Cut]:
        if self.budget is None:
            merged = round((0.25 if self.ratio is None else self.ratio) * visual)
        else:
            per_token = average_visual_tokens([Cut(0, 1.0), *self._pruning(depth, 1.0)], depth, 1.0)
            if self.budget > per_token * visual:
                raise ValueError(
                    f"aim: budget {self.budget} exceeds what this schedule keeps at ratio 1 ({per_token * visual:.1f})"
                )
            merged = round(self.budget / per_token)
        pruning = [Cut(cut.layer, round(cut.keep)) for cut in self._pruning(depth, merged)]
        return [merge_cut(0, merged, BipartiteMerge()), *pruning]

    @property
    def scorer(self) -> Scorer:
        return TextRank()
