"""What every scorer receives and returns."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar, Protocol

import torch
from torch import nn


@dataclass
class ScoreInput:
    """The tokens entering a cut, seen from the layer whose attention a scorer may mimic.

    `hidden` (batch, n, dim) enters `layer` (None before the language model, where `hidden` is the embeddings);
    `candidates` marks the visual tokens that may be cut, `valid` the tokens that are neither padding nor fillers;
    `geometry` (batch, n, 4) is (media, frame, row, column) of visual tokens and -1 elsewhere, worked out by
    `locate` only for scorers that read it; `kinds` (batch, n) is text, image or video. `weight` (batch, n) is each
    token's merge weight (how many original tokens it stands for), `keep` the number of visual tokens each row
    keeps and `visual_counts` the number of candidates in each row (both counted on the CPU), and `vision_signal`
    (batch, n) the vision encoder's attention to each visual token, from `measure`, for methods that declare
    `needs_vision`.
    """

    hidden: torch.Tensor
    layer: nn.Module | None
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None
    candidates: torch.Tensor
    valid: torch.Tensor
    locate: Callable[[], torch.Tensor]
    kinds: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    keep: list[int] | None = None
    visual_counts: list[int] | None = None
    measure: Callable[[], torch.Tensor] | None = None

    @cached_property
    def geometry(self) -> torch.Tensor:
        return self.locate()

    @cached_property
    def vision_signal(self) -> torch.Tensor:
        if self.measure is None:
            raise RuntimeError("this scorer reads the vision encoder's attention; its method must set needs_vision")
        return self.measure()


class Scorer(Protocol):
    """Scores tokens; only the scores of candidates are read. `layer_offset` picks the layer to mimic
    relative to the cut (0: the first layer that sees the reduced set, -1: the one before); None needs no layer.
    A scorer that `decides_count` decides the count itself: it marks tokens that must go whatever the budget with
    -inf, and may mark tokens that stay on top of the planned count with +inf."""

    layer_offset: int | None
    decides_count: ClassVar[bool] = False

    def score(self, inputs: ScoreInput) -> torch.Tensor: ...


def decides_count(scorer: Scorer) -> bool:
    """Whether `scorer` decides how many visual tokens stay (the scorers that do say so; the others do not)."""
    return getattr(scorer, "decides_count", False)
