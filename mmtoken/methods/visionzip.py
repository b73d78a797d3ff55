"""VisionZip: dominant tokens by the vision encoder's attention, contextual tokens merged by similarity."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mmtoken.methods.base import BEFORE_LLM, Baseline, Examples, merge_cut
from mmtoken.methods.registry import register
from mmtoken.schedules import Cut
from mmtoken.scorers.contextual import DominantContextual


@register
@dataclass
class VisionZip(Baseline):
    """VisionZip (Yang et al., "VisionZip: Longer is Better but Not Necessary", arXiv 2412.04467).

    Before the language model, each row keeps its budget of visual tokens: the dominant ones, those the vision
    encoder attends to most (CLIP: the class token's attention at the feature layer; SigLIP and the Qwen ViT, which
    have no class token: the mean attention received), and a `contextual` share of merged tokens (see
    `DominantContextual`). Default share 10/64, the paper's 54 + 10, 108 + 20 and 162 + 30 on LLaVA-1.5.
    """

    name: ClassVar[str] = "visionzip"
    paper: ClassVar[str] = "arXiv 2412.04467"
    stage: ClassVar[str] = BEFORE_LLM
    examples: ClassVar[Examples] = Examples(too_deep={"layer": 6}, cutting={"ratio": 0.3}, keep_all={"ratio": 1.0})
    needs_vision: ClassVar[bool] = True
    contextual: float = 10 / 64

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.contextual <= 1:
            raise ValueError(f"visionzip: contextual must be a share in [0, 1], got {self.contextual}")

    def cuts(self, depth: int, visual: int) -> list[Cut]:
        return [
            merge_cut(cut.layer, cut.keep, DominantContextual(self.contextual)) for cut in super().cuts(depth, visual)
        ]
