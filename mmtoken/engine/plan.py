"""The plan of one prefill: which cuts happen at which decoder layer, and how many visual tokens each batch row
keeps at each, worked out on the CPU from the method's schedules before the language model runs.

A method runs as one or more steps (`Method.steps`, several for a pipeline); each step's cuts come after the cuts
of the step before. Where a step's scorer decides the count itself (`Scorer.decides_count`: pooling's cells, ATP's
threshold, a merge), the steps after it are planned once that cut is made, from its survivors (`Resume`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mmtoken.methods.base import Method
from mmtoken.reducers import Reducer
from mmtoken.schedules import Cut
from mmtoken.scorers.base import Scorer, decides_count


@dataclass
class Resume:
    """Where planning goes on once a cut whose scorer decides the count is made: at step `step`, whose cuts come
    after layer `after`, from that cut's survivors less what the later cuts of its own step keep (`later`, per row)."""

    step: int
    after: int
    later: list[list[int]]

    def counts(self, survivors: list[int]) -> list[int]:
        for keep in self.later:
            survivors = [min(count, kept) for count, kept in zip(survivors, keep, strict=True)]
        return survivors


@dataclass
class PlannedCut:
    """One cut of one prefill: the visual tokens each row keeps (on the CPU and on the device), ranked by `scorer`
    and reduced by `reducer` (the cut's own, else its method's). `resume` is set on the last cut of a step whose
    scorer decides the count: the steps after it are planned once that cut is made."""

    scorer: Scorer
    reducer: Reducer
    keep: list[int]
    keep_on_device: torch.Tensor
    resume: Resume | None = None


@dataclass
class Plan:
    """The cuts of one prefill by decoder layer (0: before the language model). Built by `extend` when the prefill
    starts, and again at a cut that `resume`s; read by every layer of that prefill, then dropped."""

    steps: list[Method]
    depth: int
    cuts: dict[int, list[PlannedCut]] = field(default_factory=dict)

    def extend(self, counts: list[int], first: int, after: int, device: torch.device) -> None:
        """Plan steps `first` on for rows of `counts` visual tokens, after layer `after`. A step whose scorer decides
        the count ends the planning: the steps after it are planned from its survivors, once its last cut that
        decides is made (and checked ahead where that cut is inside the language model)."""
        for index in range(first, len(self.steps)):
            step, planned, layers = self.steps[index], [], []
            for cut, keep in self._step_cuts(index, counts, after):
                scorer, reducer = cut.scorer or step.scorer, cut.reducer or step.reducer
                planned.append(PlannedCut(scorer, reducer, keep, torch.tensor(keep, device=device)))
                layers.append(cut.layer)
                self.cuts.setdefault(cut.layer, []).append(planned[-1])
            after = layers[-1] if layers else after
            deciding = [position for position, cut in enumerate(planned) if decides_count(cut.scorer)]
            if deciding and index + 1 < len(self.steps):
                last = deciding[-1]
                planned[last].resume = Resume(index + 1, after, [cut.keep for cut in planned[last + 1 :]])
                if layers[last] > 0:
                    self._check_ahead(index + 1, counts, after, step.name, layers[last])
                return
            for cut in planned:
                counts = [min(count, kept) for count, kept in zip(counts, cut.keep, strict=True)]

    def _step_cuts(self, index: int, counts: list[int], after: int) -> list[tuple[Cut, list[int]]]:
        """The cuts of step `index` in layer order, each with the visual tokens each row keeps there, for rows of
        `counts` visual tokens; raises unless they come after layer `after`, the last cut of the step before.
        Rows of different counts may cut at different layers (a budget solved per count moves a curve's cuts):
        where a row makes no cut of its own it keeps all it has. A row without visual tokens has nothing to cut,
        nor a budget to meet."""
        step = self.steps[index]
        schedules = {
            count: {cut.layer: cut for cut in step.cuts(self.depth, count)} if count else {} for count in set(counts)
        }
        layers = sorted({layer for schedule in schedules.values() for layer in schedule})
        if layers and (layers[0] < after or 0 < layers[0] == after):
            raise ValueError(
                f"pipeline: step {index + 1} ({step.name}) cuts at layer {layers[0]}, not after the step before it "
                f"(its last cut is at layer {after})"
            )
        return [
            (
                next(schedule[layer] for schedule in schedules.values() if layer in schedule),
                [schedules[count][layer].keep if layer in schedules[count] else count for count in counts],
            )
            for layer in layers
        ]

    def _check_ahead(self, first: int, counts: list[int], after: int, decider: str, layer: int) -> None:
        """Raise now, before the language model runs, for the steps from `first` on: they are planned only at
        decoder layer `layer`, where `decider` decides how many visual tokens stay. So none may have a budget (what
        it starts from is unknown until then), and their cuts must come after the step before's, which is checked
        for `counts`, the most they can start from."""
        for index in range(first, len(self.steps)):
            step = self.steps[index]
            if getattr(step, "budget", None) is not None:
                raise ValueError(
                    f"pipeline: step {index + 1} ({step.name}) has a budget, but the visual tokens it starts from are "
                    f"only known at layer {layer}, inside the language model, where {decider} decides how many stay: "
                    "give it a ratio or a schedule instead"
                )
            cuts = self._step_cuts(index, counts, after)
            after = cuts[-1][0].layer if cuts else after
