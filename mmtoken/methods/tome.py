"""ToMe: bipartite soft matching of the visual tokens before the language model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mmtoken.methods.base import BEFORE_LLM, Baseline, Examples, merge_cut
from mmtoken.methods.registry import register
from mmtoken.schedules import Cut
from mmtoken.scorers.bipartite import BipartiteMerge


@register
@dataclass
class ToMe(Baseline):
    """ToMe (Bolya et al., "Token Merging: Your ViT But Faster", arXiv 2210.09461), on the projected visual features
    before the language model, as AIM's first stage: rounds of bipartite soft matching merge the most similar tokens,
    size-weighted, until each row keeps its budget. `layer` merges the hidden states at that decoder layer instead.

    Merging inside the vision encoder is not offered: the processor fixes the number of visual placeholders in the
    prompt, so the tower's output must keep its length; its attention is also where VisionZip reads its signal.
    """

    name: ClassVar[str] = "tome"
    paper: ClassVar[str] = "arXiv 2210.09461"
    stage: ClassVar[str] = BEFORE_LLM
    examples: ClassVar[Examples] = Examples(too_deep={"layer": 6}, cutting={"ratio": 0.3}, keep_all={"ratio": 1.0})

    def cuts(self, depth: int, visual: int) -> list[Cut]:
        return [merge_cut(cut.layer, cut.keep, BipartiteMerge()) for cut in super().cuts(depth, visual)]
