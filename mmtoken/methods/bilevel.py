"""Bi-level KV: dense entries for the chunks of a video the question attends to, pooled ones for the rest."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mmtoken.kv import Press
from mmtoken.kv.snapkv import SnapKV
from mmtoken.methods.base import CachePress, Examples
from mmtoken.methods.registry import register


@register
@dataclass
class BiLevel(CachePress):
    """Video-XL-2's bi-level KV decoding (Qin et al., arXiv 2506.19225), training-free: after the prefill, the
    video is cut into chunks of `chunk` frames, and each chunk's relevance is the attention the prompt's last
    `window` queries pay to its entries, at every decoder layer. The `top` chunks keep their KV
    entries; in the others every `pool` consecutive visual entries become their mean (pool 0: they leave). The
    paper reads its chunks' relevance from an external retriever run offline; here it is computed. Defaults: chunks
    of 4 frames, the top 2 dense, pooled by 4 as the paper's code pools."""

    name: ClassVar[str] = "bilevel"
    paper: ClassVar[str] = "arXiv 2506.19225"
    examples: ClassVar[Examples] = Examples(too_deep=None, cutting={"chunk": 1, "top": 1}, keep_all={"top": 1000})
    chunk: int = 4
    top: int = 2
    pool: int = 4
    window: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ratio is not None or self.capacity is not None or self.chunk_frames is not None or not self.visual_only:
            raise ValueError("bilevel keeps whole chunks of a video: give chunk, top and pool, not ratio, capacity, "
                             "chunk_frames or visual_only")  # fmt: skip
        if self.chunk < 1 or self.top < 0 or self.pool < 0 or self.window < 1:
            raise ValueError(f"bilevel: chunk and window must be >= 1, top and pool >= 0; got chunk {self.chunk}, "
                             f"top {self.top}, pool {self.pool}, window {self.window}")  # fmt: skip

    @property
    def press(self) -> Press:
        return SnapKV(self.window)
