"""G-Search: a per-layer schedule of visual tokens found by greedy search, shallow to deep."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mmtoken.methods.base import CurveMethod, Examples, check_budget
from mmtoken.methods.registry import register
from mmtoken.schedules.curves import solve_curve


@register
@dataclass
class GSearch(CurveMethod):
    """G-Search ("Accelerating Multimodal LLMs by Searching Optimal Vision Token Reduction",
    arXiv 2412.00556). The paper finds that the attention ranking of visual tokens is alike in every layer but
    the first, so the tokens worth keeping never grow with depth; it searches, shallow to deep, the fewest
    tokens each layer can keep with accuracy held. `mmtoken search gsearch` runs that search on a probe model
    and writes `keep` as YAML for `mmtoken.patch`.

    `keep` lists the visual tokens alive at each decoder layer (non-increasing, layer 0 keeping all) for an input
    of `visual` tokens; other inputs keep the same shares. Cuts are ranked by the last instruction token's
    attention recomputed at the cut layer (as PyramidDrop). `budget` scales the schedule's shares to average it.
    """

    name: ClassVar[str] = "gsearch"
    paper: ClassVar[str] = "arXiv 2412.00556"
    examples: ClassVar[Examples] = Examples(too_deep={"keep": (576,) * 7})
    keep: tuple[int, ...] | None = None
    visual: int = 576
    budget: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.keep is None:
            raise ValueError("gsearch: give `keep`, the visual tokens at each layer (`mmtoken search gsearch`)")
        self.keep = tuple(self.keep)
        if self.visual < 1:
            raise ValueError(f"gsearch: visual must be >= 1, got {self.visual}")
        if self.keep[:1] != (self.visual,) or list(self.keep) != sorted(self.keep, reverse=True) or self.keep[-1] < 0:
            raise ValueError(
                f"gsearch: keep must start at visual ({self.visual}) and never grow with depth, got {self.keep}"
            )
        if self.budget is not None:
            check_budget(self.budget)

    def check_depth(self, depth: int) -> None:
        if len(self.keep) != depth:
            raise ValueError(f"gsearch: keep names {len(self.keep)} layers, the model has {depth} decoder layers")

    def shares(self, depth: int, visual: int) -> list[float]:
        shares = [count / self.visual for count in self.keep]
        if self.budget is None:
            return shares

        def scaled(scale: float) -> list[float]:
            return [1.0] + [min(1.0, scale * share) for share in shares[1:]]

        widest = max(1 / share for share in shares if share > 0)
        return scaled(solve_curve(scaled, self.budget, visual, 0.0, widest))
