"""H2O: the heavy hitters and the latest entries stay in the KV cache as decoding goes on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mmtoken.methods.base import ON_CACHE, Examples, Method
from mmtoken.methods.registry import register
from mmtoken.schedules import Cut


@register
@dataclass
class H2O(Method):
    """H2O (Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models",
    arXiv 2306.14048) while decoding: in every decoder layer but the first, a cache that would pass `capacity`
    entries evicts before each step, keeping the `recent` latest entries and, of the others, those that received
    the most attention summed over the decode steps so far (each step's query against every entry, recomputed
    under any attention backend). The prefill runs unpatched; eviction starts with the first decode step."""

    name: ClassVar[str] = "h2o"
    paper: ClassVar[str] = "arXiv 2306.14048"
    stage: ClassVar[str] = ON_CACHE
    examples: ClassVar[Examples] = Examples(too_deep=None, cutting={"capacity": 24, "recent": 4},
                                            keep_all={"capacity": 10**6})  # fmt: skip
    capacity: int = 512
    recent: int = 32

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.recent < self.capacity:
            raise ValueError(f"h2o: recent must be >= 1 and below capacity; got recent {self.recent}, "
                             f"capacity {self.capacity}")  # fmt: skip

    def cuts(self, depth: int, visual: int) -> list[Cut]:
        return []

    def named_layers(self, depth: int) -> tuple[int, ...]:
        return ()
