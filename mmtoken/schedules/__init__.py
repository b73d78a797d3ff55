"""Schedules: where tokens are cut and how many visual tokens each stretch of layers keeps.

A schedule is a list of `Cut`s. Budgets follow the papers' tables: the average number of visual tokens per
language-model layer (`average_visual_tokens`), so FLOPs compare across methods.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mmtoken.reducers import Reducer
    from mmtoken.scorers.base import Scorer


@dataclass(frozen=True)
class Cut:
    """From decoder layer `layer` on (0: before the language model), `keep` visual tokens of a row survive.
    `scorer` ranks them and `reducer` removes the rest where a method makes this cut unlike its others (FEATHER's
    first cut, a merge before the language model followed by pruning inside it); None: the method's own."""

    layer: int
    keep: int
    scorer: Scorer | None = None
    reducer: Reducer | None = None


def average_visual_tokens(cuts: list[Cut], depth: int, visual: int) -> float:
    """The mean over the `depth` decoder layers of the visual tokens alive, starting from `visual`."""
    alive, total, start = visual, 0.0, 0
    for cut in cuts:
        total += alive * (cut.layer - start)
        alive, start = min(alive, cut.keep), cut.layer
    return (total + alive * (depth - start)) / depth


def single_cut_keep(budget: float, layer: int, depth: int, visual: int) -> int:
    """How many visual tokens one cut at `layer` keeps so that the average per layer is `budget`."""
    if budget > visual:
        raise ValueError(f"budget {budget} exceeds the {visual} visual tokens of this input")
    keep = round((budget * depth - layer * visual) / (depth - layer))
    if keep < 0:
        lowest = layer * visual / depth
        raise ValueError(f"budget {budget} is unreachable with a cut at layer {layer}: the lowest is {lowest:.1f}")
    return keep


def solve_ratio(average: Callable[[float], float], target: float, low: float = 0.0, high: float = 1.0) -> float:
    """The parameter in (low, high] (by default a ratio in (0, 1]) whose schedule averages `target` visual tokens
    per layer (bisection; `average` must grow with the parameter)."""
    if average(high) < target:
        raise ValueError(f"budget {target} exceeds the most this schedule keeps ({average(high):.1f})")
    if average(low) > target:
        raise ValueError(f"budget {target} is unreachable with this schedule: the lowest is {average(low):.1f}")
    for _ in range(50):
        middle = (low + high) / 2
        low, high = (middle, high) if average(middle) < target else (low, middle)
    return high
