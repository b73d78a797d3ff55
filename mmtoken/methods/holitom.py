"""HoliTom: holistic token merging for video, before the language model and inside it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mmtoken.methods.base import BEFORE_AND_AT_LAYER, Examples, Method, check_ratio_or_budget, merge_cut
from mmtoken.methods.registry import register
from mmtoken.reducers import NearestMerge
from mmtoken.schedules import Cut
from mmtoken.scorers import LastQueryAttention
from mmtoken.scorers.holitom import HoliTomMerge


@register
@dataclass
class HoliTom(Method):
    """HoliTom (Shao et al., "HoliTom: Holistic Token Merging for Fast Video Large Language Models",
    arXiv 2505.21334).

    Before the language model (`HoliTomMerge`): global redundancy-aware temporal segmentation of each video and
    merging of its static tokens into their first frame at cosine similarity above `threshold`, then spatial
    reduction to `ratio` of the visual tokens (density-peak clusters of the static tokens, the dynamic tokens the
    vision encoder attends to most). At decoder layer `layer`, a `merge` share of the visual tokens left, those the
    last prompt token attends to least at the layer before, merge into their most similar kept token (0: no inner
    merge, the paper's "w/o M"). `budget` (average visual tokens per layer) solves for the ratio. Images are single
    frames. How many tokens the outer stage keeps depends on the video; `handle.stats` reports what it reached.
    Defaults: ratio 0.15, threshold 0.8, layer 18, merge 0.5, the repository's LLaVA-OneVision-7B example.
    """

    name: ClassVar[str] = "holitom"
    paper: ClassVar[str] = "arXiv 2505.21334"
    stage: ClassVar[str] = BEFORE_AND_AT_LAYER
    examples: ClassVar[Examples] = Examples(
        too_deep={"layer": 6},
        cutting={"ratio": 0.3, "layer": 3},
        keep_all={"ratio": 1.0, "threshold": 1.0, "merge": 0.0},
    )
    needs_vision: ClassVar[bool] = True
    ratio: float | None = None
    budget: float | None = None
    threshold: float = 0.8
    layer: int = 18
    merge: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        check_ratio_or_budget("holitom", self.ratio, self.budget)
        if not -1 <= self.threshold <= 1:
            raise ValueError(f"holitom: threshold is a cosine similarity in [-1, 1], got {self.threshold}")
        if self.layer < 1:
            raise ValueError(f"holitom: layer must be >= 1 (the layer before it ranks the tokens), got {self.layer}")
        if not 0 <= self.merge < 1:
            raise ValueError(f"holitom: merge must be a share in [0, 1), got {self.merge}")

    def named_layers(self, depth: int) -> tuple[int, ...]:
        return (self.layer,) if self.merge else ()  # without the inner merge, no cut at `layer`

    def _outer(self, depth: int) -> float | None:
        """Visual tokens the outer stage keeps for `budget`: the average over the layers is that count, times a
        share 1 - merge from `layer` on."""
        if self.budget is None:
            return None
        inner = (self.layer + (depth - self.layer) * (1 - self.merge)) / depth if self.merge else 1.0
        return self.budget / inner

    def cuts(self, depth: int, visual: int) -> list[Cut]:
        outer = self._outer(depth)
        if outer is None:
            outer = (0.15 if self.ratio is None else self.ratio) * visual
        elif outer > visual:
            raise ValueError(
                f"holitom: budget {self.budget} exceeds what this schedule keeps at ratio 1 "
                f"({visual * self.budget / outer:.1f})"
            )
        ratio = 0.15 if self.ratio is None and self.budget is None else self.ratio
        # every token stays a candidate: the grouping decides how many stay
        cuts = [merge_cut(0, visual, HoliTomMerge(self.threshold, ratio, self._outer(depth)))]
        if self.merge:
            keep = round(outer * (1 - self.merge))
            cuts.append(Cut(self.layer, keep, LastQueryAttention(layer_offset=-1), NearestMerge()))
        return cuts
