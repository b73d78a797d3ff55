"""Schedules given as a curve: the share of the visual tokens alive at each decoder layer.

Layer 0 keeps every token (a curve's cuts are ranked by attention, which needs a layer to recompute it at); a cut
is made at each later layer whose share is below the layer before's, so the cut layers depend on the curve
only, never on the input's visual count.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from mmtoken.schedules import Cut, solve_ratio


def curve_cuts(shares: list[float], visual: int) -> list[Cut]:
    """The cuts that keep `round(share * visual)` visual tokens from each layer on."""
    return [
        Cut(layer, round(visual * share))
        for layer, share in enumerate(shares)
        if layer > 0 and share < shares[layer - 1]
    ]


def curve_average(shares: list[float], visual: int) -> float:
    """Average visual tokens per layer of a non-increasing curve (before rounding)."""
    return visual * sum(shares) / len(shares)


def solve_curve(curve: Callable[[float], list[float]], budget: float, visual: int, low: float, high: float) -> float:
    """The parameter in (low, high] whose curve (a function of it, growing with it) averages `budget`."""
    if budget > visual:
        raise ValueError(f"budget {budget} exceeds the {visual} visual tokens of this input")
    return solve_ratio(lambda parameter: curve_average(curve(parameter), visual), budget, low, high)


def shifted_cosine(depth: int, shift: float, highest: float = 0.85, lowest: float = 0.15) -> list[float]:
    """p-MoD's progressive ratio decay (arXiv 2412.04449): layer l keeps `shift + cos(pi l / (depth - 1)) / 2`
    of the visual tokens, at least `lowest`; layers whose share would be above `highest` keep them all."""
    shares = [1.0]
    for layer in range(1, depth):
        share = shift + math.cos(math.pi * layer / max(depth - 1, 1)) / 2
        shares.append(1.0 if share > highest else max(lowest, min(share, 1.0)))
    return shares


def sigmoid(depth: int, center: float, slope: float, floor: float) -> list[float]:
    """A falling sigmoid over relative depth x = l / depth: `floor + (1 - floor) / (1 + exp(slope (x - center)))`;
    layer 0 keeps every token."""
    return [1.0] + [
        floor + (1 - floor) / (1 + math.exp(min(slope * (layer / depth - center), 700.0))) for layer in range(1, depth)
    ]
