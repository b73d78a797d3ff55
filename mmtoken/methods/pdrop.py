"""PyramidDrop: several cuts inside the language model, each keeping a fixed ratio of the stage before."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mmtoken.methods.base import AT_LAYER, Examples, Method, check_layers, check_ratio_or_budget
from mmtoken.methods.registry import register
from mmtoken.schedules import Cut, average_visual_tokens, solve_ratio
from mmtoken.scorers import LastQueryAttention, Scorer


@register
@dataclass
class PyramidDrop(Method):
    """PyramidDrop (Xing et al., arXiv 2410.17247).

    `layers` are the first layers of each reduced stage; stage s keeps `ratio`**s of the visual tokens, ranked
    by the attention of the last instruction token, recomputed with the first layer of the stage (its norm,
    q/k projections and rotary embedding). `budget` (average visual tokens per layer) solves for the ratio
    instead. Defaults: layers 8 / 16 / 24, ratio 0.5, as the paper's LLaVA-1.5 setting.
    """

    name: ClassVar[str] = "pdrop"
    paper: ClassVar[str] = "arXiv 2410.17247"
    stage: ClassVar[str] = AT_LAYER
    examples: ClassVar[Examples] = Examples(
        too_deep={"layers": (2, 6)}, cutting={"layers": (2, 4), "ratio": 0.5}, keep_all={"layers": (2, 4), "ratio": 1.0}
    )
    layers: tuple[int, ...] = (8, 16, 24)
    ratio: float | None = None
    budget: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.layers = check_layers(self.name, self.layers)
        check_ratio_or_budget(self.name, self.ratio, self.budget)

    def named_layers(self, depth: int) -> tuple[int, ...]:
        return self.layers

    def _schedule(self, ratio: float, visual: int) -> list[Cut]:
        return [Cut(layer, round(visual * ratio ** (stage + 1))) for stage, layer in enumerate(self.layers)]

    def cuts(self, depth: int, visual: int) -> list[Cut]:
        if self.budget is None:
            return self._schedule(0.5 if self.ratio is None else self.ratio, visual)
        if self.budget > visual:
            raise ValueError(f"pdrop: budget {self.budget} exceeds the {visual} visual tokens of this input")
        ratio = solve_ratio(
            lambda r: average_visual_tokens(
                [Cut(layer, visual * r ** (stage + 1)) for stage, layer in enumerate(self.layers)], depth, visual
            ),
            self.budget,
        )
        return self._schedule(ratio, visual)

    @property
    def scorer(self) -> Scorer:
        return LastQueryAttention(layer_offset=0)
