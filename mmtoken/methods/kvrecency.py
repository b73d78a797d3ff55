"""Recency on the KV cache: the baseline of sliding windows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mmtoken.kv import Press
from mmtoken.kv.recency import Recency
from mmtoken.methods.base import CachePress, Examples
from mmtoken.methods.registry import register


@register
@dataclass
class KVRecency(CachePress):
    """The latest KV entries stay, the rest leave: the window baseline of streaming caches (StreamingLLM, Xiao et
    al., arXiv 2309.17453, here without attention sinks). On a video, the last frames stay."""

    name: ClassVar[str] = "kvrecency"
    paper: ClassVar[str] = "arXiv 2309.17453"
    examples: ClassVar[Examples] = Examples(too_deep=None, cutting={"ratio": 0.5}, keep_all={"ratio": 1.0})

    @property
    def press(self) -> Press:
        return Recency()
