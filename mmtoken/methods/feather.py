"""FEATHER: two cuts inside the language model, ranked by attention without rotary phases, plus a lattice."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mmtoken.methods.base import AT_LAYER, Examples, Method, check_layers, check_ratio_or_budget
from mmtoken.methods.registry import register
from mmtoken.schedules import Cut, average_visual_tokens, solve_ratio
from mmtoken.scorers import LastQueryAttention, Scorer
from mmtoken.scorers.lattice import PlusLattice


@register
@dataclass
class Feather(Method):
    """FEATHER (Endo et al., "Feather the Throttle", arXiv 2412.13180).

    FastV's last-token attention carries RoPE's pull towards the end of the prompt and so prunes the top of the
    image; FEATHER ranks by the same attention computed without rotary phases (at the layer before each cut),
    and cuts twice. The first cut (`layers[0]`) keeps every token on the `stride` x `stride` lattice of the grid
    plus the `ratio` * N best-ranked others; the second (`layers[1]`) keeps the `ratio`**2 * N best-ranked.
    Defaults as the paper's LLaVA-1.5 setting: layers 8 / 16, ratio 0.3 (its "reduction 0.7"), stride 3.
    The paper unites the lattice with the top `ratio` * N, so it keeps fewer where they overlap; keeping the
    best others instead makes the count, and so the budget, exact. `budget` solves for the ratio, counting the
    lattice as N / stride**2 tokens (exact for a grid whose sides are multiples of the stride).
    """

    name: ClassVar[str] = "feather"
    paper: ClassVar[str] = "arXiv 2412.13180"
    stage: ClassVar[str] = AT_LAYER
    examples: ClassVar[Examples] = Examples(
        too_deep={"layers": (2, 6)}, cutting={"layers": (2, 4), "ratio": 0.3}, keep_all={"layers": (2, 4), "ratio": 1.0}
    )
    layers: tuple[int, int] = (8, 16)
    ratio: float | None = None
    stride: int = 3
    budget: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.layers = check_layers(self.name, self.layers)
        if len(self.layers) != 2:
            raise ValueError(f"feather: give two layers (an early cut and a deeper one), got {self.layers}")
        if self.stride < 1:
            raise ValueError(f"feather: stride must be >= 1, got {self.stride}")
        check_ratio_or_budget(self.name, self.ratio, self.budget)

    def named_layers(self, depth: int) -> tuple[int, ...]:
        return self.layers

    def _schedule(self, ratio: float, visual: int) -> list[Cut]:
        lattice = PlusLattice(self.scorer, self.stride)
        early, deep = self.layers
        return [Cut(early, round(visual * ratio), scorer=lattice), Cut(deep, round(visual * ratio**2))]

    def cuts(self, depth: int, visual: int) -> list[Cut]:
        if self.budget is None:
            return self._schedule(0.3 if self.ratio is None else self.ratio, visual)
        if self.budget > visual:
            raise ValueError(f"feather: budget {self.budget} exceeds the {visual} visual tokens of this input")
        early, deep = self.layers
        lattice = visual / self.stride**2
        ratio = solve_ratio(
            lambda r: average_visual_tokens(
                [Cut(early, visual * r + lattice), Cut(deep, visual * r**2)], depth, visual
            ),
            self.budget,
        )
        return self._schedule(ratio, visual)

    @property
    def scorer(self) -> Scorer:
        return LastQueryAttention(layer_offset=-1, rope=False)
