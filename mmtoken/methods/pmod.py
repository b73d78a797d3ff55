"""p-MoD's progressive ratio decay, applied training-free as cuts at every layer of the decay."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mmtoken.methods.base import CurveMethod, Examples, check_budget
from mmtoken.methods.registry import register
from mmtoken.schedules.curves import shifted_cosine, solve_curve


@register
@dataclass
class ProgressiveDecay(CurveMethod):
    """p-MoD's progressive ratio decay (Zhang et al., arXiv 2412.04449), training-free.

    p-MoD trains a router per layer and lets each layer process a share of the visual tokens that falls with
    depth along a shifted cosine: `shift + cos(pi l / (L - 1)) / 2`, clipped below at `lowest`, with layers
    whose share would exceed `highest` left whole. Here the same curve is a schedule of cuts, one at every layer
    where the share falls, ranked by the last instruction token's attention recomputed at that layer (as
    PyramidDrop). Defaults as the paper's: shift 0.5, highest 0.85, lowest 0.15. `budget` solves for the shift.
    """

    name: ClassVar[str] = "pmod"
    paper: ClassVar[str] = "arXiv 2412.04449"
    examples: ClassVar[Examples] = Examples(too_deep=None)
    shift: float = 0.5
    highest: float = 0.85
    lowest: float = 0.15
    budget: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.lowest <= self.highest <= 1:
            raise ValueError(f"pmod: need 0 <= lowest <= highest <= 1, got {self.lowest} and {self.highest}")
        if self.budget is not None:
            check_budget(self.budget)

    def shares(self, depth: int, visual: int) -> list[float]:
        shift = self.shift
        if self.budget is not None:
            shift = solve_curve(lambda s: shifted_cosine(depth, s, self.highest, self.lowest), self.budget, visual,
                                low=-1.5, high=1.5)  # fmt: skip
        return shifted_cosine(depth, shift, self.highest, self.lowest)
