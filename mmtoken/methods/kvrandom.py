"""Random KV entries: the floor every press must beat."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mmtoken.kv import Press
from mmtoken.kv.random import RandomEntries
from mmtoken.methods.base import CachePress, Examples
from mmtoken.methods.registry import register


@register
@dataclass
class KVRandom(CachePress):
    """A uniformly random share of the KV entries stays, drawn from `seed` (the random baseline that KV
    compression studies such as kvpress's report beside their presses)."""

    name: ClassVar[str] = "kvrandom"
    paper: ClassVar[str] = "baseline"
    examples: ClassVar[Examples] = Examples(too_deep=None, cutting={"ratio": 0.5}, keep_all={"ratio": 1.0})
    seed: int = 0

    @property
    def press(self) -> Press:
        return RandomEntries(self.seed)
