"""SnapKV: keep the KV entries the question attends to."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mmtoken.kv import Press
from mmtoken.kv.snapkv import SnapKV as SnapKVPress
from mmtoken.methods.base import CachePress, Examples
from mmtoken.methods.registry import register


@register
@dataclass
class SnapKV(CachePress):
    """SnapKV (Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", arXiv 2404.14469) on the
    KV cache after the prefill: the entries the prompt's last `window` tokens attend to, pooled over `kernel`
    neighbours, stay. Defaults: window 8 (a short question's tail), kernel 5."""

    name: ClassVar[str] = "snapkv"
    paper: ClassVar[str] = "arXiv 2404.14469"
    examples: ClassVar[Examples] = Examples(too_deep=None, cutting={"ratio": 0.5}, keep_all={"ratio": 1.0})
    window: int = 8
    kernel: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window < 1:
            raise ValueError(f"snapkv: window must be >= 1 query, got {self.window}")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"snapkv: kernel must be an odd number of entries, got {self.kernel}")

    @property
    def press(self) -> Press:
        return SnapKVPress(self.window, self.kernel)
