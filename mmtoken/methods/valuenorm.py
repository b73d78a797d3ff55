"""Value norm: keep the KV entries whose values carry the most."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mmtoken.kv import Press
from mmtoken.kv.value_norm import ValueNorm as ValueNormPress
from mmtoken.methods.base import CachePress, Examples
from mmtoken.methods.registry import register


@register
@dataclass
class ValueNorm(CachePress):
    """InfiniPot-V's value-norm rule (Kim et al., "InfiniPot-V: Memory-Constrained KV Cache Compression for
    Streaming Video Understanding", arXiv 2506.15745) on the KV cache after the prefill: the entries with the
    largest value norms stay. It reads no question, so it serves later turns alike."""

    name: ClassVar[str] = "valuenorm"
    paper: ClassVar[str] = "arXiv 2506.15745"
    examples: ClassVar[Examples] = Examples(too_deep=None, cutting={"ratio": 0.5}, keep_all={"ratio": 1.0})

    @property
    def press(self) -> Press:
        return ValueNormPress()
