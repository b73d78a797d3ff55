"""FastV: one cut inside the language model, ranked by the last token's attention."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mmtoken.methods.base import AT_LAYER, Examples, SingleCut
from mmtoken.methods.registry import register
from mmtoken.scorers import LastQueryAttention, Scorer


@register
@dataclass
class FastV(SingleCut):
    """FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", arXiv 2403.06764).

    Layer `k` is the first to see the reduced set; the ranking is the attention the last prompt token pays at
    layer k - 1, averaged over heads. Defaults: K = 2, R = 50%.
    """

    name: ClassVar[str] = "fastv"
    paper: ClassVar[str] = "arXiv 2403.06764"
    stage: ClassVar[str] = AT_LAYER
    examples: ClassVar[Examples] = Examples(
        too_deep={"k": 6}, cutting={"k": 2, "ratio": 0.4}, keep_all={"k": 2, "ratio": 1.0}
    )
    default_ratio: ClassVar[float] = 0.5
    k: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.k < 1:
            raise ValueError(f"fastv: k must be >= 1 (layer k - 1 ranks the tokens), got {self.k}")

    @property
    def cut_layer(self) -> int:
        return self.k

    @property
    def scorer(self) -> Scorer:
        return LastQueryAttention(layer_offset=-1)
