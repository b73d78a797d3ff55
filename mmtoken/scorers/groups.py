"""Merging methods as a scorer and a reducer that share one grouping: which token each visual token merges into.

A `Grouping` returns `target` (batch, n): the index in the set of the token each token merges into, itself for
the tokens that stay (the groups' heads), -1 for tokens that leave without merging. `GroupHeads` keeps the heads;
`mmtoken.reducers.GroupMean` turns each head into the weighted mean of its group.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from mmtoken.scorers.base import ScoreInput


def pick_rows(tensor: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """The batch rows `rows` of `tensor`: the tensor itself when they are all of them, in order."""
    return tensor if rows == list(range(len(tensor))) else torch.stack([tensor[row] for row in rows])


def grouped_targets(inputs: ScoreInput, assign: Callable[[list[int], torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """(batch, n) targets built for rows that have as many candidates and keep as many tokens at once:
    `assign(rows, index)` gets the set indices `index` (len(rows), count) of those rows' candidates and returns each
    one's target as a position in its row of `index` (or -1); every other token stays."""
    batch, length = inputs.candidates.shape
    target = torch.arange(length, device=inputs.candidates.device).repeat(batch, 1)
    order = inputs.candidates.int().argsort(dim=1, descending=True, stable=True)
    groups: dict[tuple[int, int], list[int]] = {}
    for row, key in enumerate(zip(inputs.visual_counts, inputs.keep or [0] * batch, strict=True)):
        groups.setdefault(key, []).append(row)
    for (count, _), rows in groups.items():
        if count:
            index = pick_rows(order, rows)[:, :count]
            local = assign(rows, index)
            named = torch.where(local >= 0, index.gather(1, local.clamp(min=0)), -1)
            if len(rows) == batch:
                target.scatter_(1, index, named)
            else:
                for place, row in enumerate(rows):
                    target[row, index[place]] = named[place]
    return target


def row_targets(inputs: ScoreInput, assign: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """`grouped_targets` for an `assign(row, index)` that takes one row at a time."""
    return grouped_targets(
        inputs, lambda rows, index: torch.stack([assign(*pair) for pair in zip(rows, index, strict=True)])
    )


@dataclass
class Grouping:
    """Base of groupings: computes `targets` once per cut, whoever asks first (the scorer or the reducer).

    `decides_count` says that a row may keep another number of visual tokens than planned (the grouping decides),
    so the engine counts them after the cut.
    """

    decides_count: ClassVar[bool] = False
    _memo: tuple[ScoreInput, torch.Tensor] | None = field(default=None, init=False, repr=False, compare=False)

    def targets(self, inputs: ScoreInput) -> torch.Tensor:
        if self._memo is None or self._memo[0] is not inputs:
            self._memo = (inputs, self.group(inputs))
        return self._memo[1]

    def group(self, inputs: ScoreInput) -> torch.Tensor:
        raise NotImplementedError


@dataclass
class GroupHeads:
    """Scores 0 for the heads of a grouping's groups and -inf for the rest, so a cut keeps exactly the heads."""

    grouping: Grouping
    layer_offset: int | None = None

    @property
    def decides_count(self) -> bool:
        return self.grouping.decides_count

    def score(self, inputs: ScoreInput) -> torch.Tensor:
        target = self.grouping.targets(inputs)
        own = torch.arange(target.shape[1], device=target.device)
        return torch.where(target == own, 0.0, float("-inf"))
