"""P-Sigmoid: a parametric sigmoid over depth for the share of visual tokens each layer keeps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mmtoken.methods.base import CurveMethod, Examples, check_budget
from mmtoken.methods.registry import register
from mmtoken.schedules.curves import sigmoid, solve_curve


@register
@dataclass
class PSigmoid(CurveMethod):
    """P-Sigmoid ("Accelerating Multimodal LLMs by Searching Optimal Vision Token Reduction",
    arXiv 2412.00556): the share of visual tokens alive at layer l falls along a sigmoid of the relative depth
    x = l / L, `floor + (1 - floor) / (1 + exp(slope (x - center)))`, cut at every layer and ranked by the last
    instruction token's attention recomputed there. The paper tunes the curve's parameters by Bayesian
    optimisation for the best accuracy under a FLOPs budget: `mmtoken search psigmoid` does that on a probe
    model and writes them as YAML for `mmtoken.patch`. `budget` solves for the center, keeping slope and floor.
    """

    name: ClassVar[str] = "psigmoid"
    paper: ClassVar[str] = "arXiv 2412.00556"
    examples: ClassVar[Examples] = Examples(too_deep=None)
    center: float = 0.5
    slope: float = 12.0
    floor: float = 0.1
    budget: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.slope <= 0:
            raise ValueError(f"psigmoid: slope must be > 0, got {self.slope}")
        if not 0 <= self.floor <= 1:
            raise ValueError(f"psigmoid: floor must be in [0, 1], got {self.floor}")
        if self.budget is not None:
            check_budget(self.budget)

    def shares(self, depth: int, visual: int) -> list[float]:
        center = self.center
        if self.budget is not None:
            center = solve_curve(lambda c: sigmoid(depth, c, self.slope, self.floor), self.budget, visual,
                                 low=-1.0, high=2.0)  # fmt: skip
        return sigmoid(depth, center, self.slope, self.floor)
