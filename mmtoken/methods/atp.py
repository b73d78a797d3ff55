"""ATP-style adaptive pruning: each row keeps its own count at each cut, read off its attention distribution."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mmtoken.methods.base import AT_LAYER, Examples, Method, check_budget, check_layers
from mmtoken.methods.pdrop import PyramidDrop
from mmtoken.methods.registry import register
from mmtoken.schedules import Cut
from mmtoken.scorers import Scorer
from mmtoken.scorers.nucleus import AttentionNucleus


@register
@dataclass
class AdaptivePrune(Method):
    """ATP-LLaVA's instance- and layer-wise pruning, training-free (Ye et al., arXiv 2412.00447).

    At each of `layers` every row keeps the fewest visual tokens holding `mass` of the last instruction token's
    attention (recomputed at that layer), plus a `spatial` share of them spread evenly over the grid (the paper's
    Spatial Augmented Pruning). ATP learns its thresholds; here the threshold is where each row's own attention
    distribution reaches `mass`, so an image whose attention is peaked keeps few tokens and a busy one many.
    Layers default to 4 / 14 / 24, where the public re-implementation places its modules. `budget` caps the
    tokens each cut picks by attention at the PyramidDrop-shaped count that averages `budget` (the spatial share
    comes on top); either way the count is the row's own, and `handle.stats` reports the budget achieved
    (`avg_visual_tokens`, `visual_tokens_per_layer`).
    """

    name: ClassVar[str] = "atp"
    paper: ClassVar[str] = "arXiv 2412.00447"
    stage: ClassVar[str] = AT_LAYER
    examples: ClassVar[Examples] = Examples(
        too_deep={"layers": (2, 6)},
        cutting={"layers": (2, 4), "mass": 0.5},
        keep_all={"layers": (2, 4), "spatial": 1.0},
    )
    layers: tuple[int, ...] = (4, 14, 24)
    mass: float = 0.9
    spatial: float = 0.1
    budget: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.layers = check_layers(self.name, self.layers)
        if not 0 < self.mass <= 1:
            raise ValueError(f"atp: mass must be in (0, 1], got {self.mass}")
        if not 0 <= self.spatial <= 1:
            raise ValueError(f"atp: spatial must be in [0, 1], got {self.spatial}")
        if self.budget is not None:
            check_budget(self.budget)

    def named_layers(self, depth: int) -> tuple[int, ...]:
        return self.layers

    def cuts(self, depth: int, visual: int) -> list[Cut]:
        if self.budget is None:
            return [Cut(layer, visual) for layer in self.layers]
        return PyramidDrop(layers=self.layers, budget=self.budget).cuts(depth, visual)

    @property
    def scorer(self) -> Scorer:
        return AttentionNucleus(mass=self.mass, spatial=self.spatial)
