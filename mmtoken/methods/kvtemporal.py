"""Temporal redundancy on the KV cache: what the latest frame repeats leaves first."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mmtoken.kv import Press
from mmtoken.kv.temporal import TemporalRedundancy
from mmtoken.methods.base import CachePress, Examples
from mmtoken.methods.registry import register


@register
@dataclass
class KVTemporal(CachePress):
    """InfiniPot-V's temporal-redundancy rule (Kim et al., "InfiniPot-V: Memory-Constrained KV Cache Compression for
    Streaming Video Understanding", arXiv 2506.15745) on the KV cache after the prefill: a video's entries whose
    keys the latest frame repeats at the same place leave first; the latest frame stays. Query-agnostic."""

    name: ClassVar[str] = "kvtemporal"
    paper: ClassVar[str] = "arXiv 2506.15745"
    examples: ClassVar[Examples] = Examples(too_deep=None, cutting={"ratio": 0.5}, keep_all={"ratio": 1.0})

    @property
    def press(self) -> Press:
        return TemporalRedundancy()
