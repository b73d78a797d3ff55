"""Recency: the latest entries stay, a sliding window's rule."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmtoken.kv.base import PressInput


@dataclass
class Recency:
    """Scores each entry by its place in the cache, so the most recent stay: the window baseline of streaming KV
    caches (StreamingLLM, Xiao et al., arXiv 2309.17453, without its attention sinks)."""

    window: int = 0

    def score(self, inputs: PressInput) -> torch.Tensor:
        batch, length = inputs.valid.shape
        return torch.arange(length, device=inputs.valid.device, dtype=torch.float32).expand(batch, -1)
