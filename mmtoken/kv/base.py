"""What every press receives and returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class PressInput:
    """One decoder layer's KV cache at the end of the prefill, as a press scores it.

    `keys` and `values` (batch, key-value heads, n, head dim) are what the layer's cache holds (keys rotated);
    `valid` (batch, n) marks the entries of real tokens (not padding or fillers) and `visual` those of visual
    tokens. `queries` (batch, heads, window, head dim), rotated, are the layer's queries of the prompt's last
    `window` tokens, the cache's last entries, for presses that read them (None for the others), `scaling` the
    layer's attention scale, and `geometry` (batch, n, 4) each entry's media, frame, row and column (-1 for text).
    """

    keys: torch.Tensor
    values: torch.Tensor
    valid: torch.Tensor
    visual: torch.Tensor
    queries: torch.Tensor | None = None
    scaling: float = 1.0
    geometry: torch.Tensor | None = None


class Press(Protocol):
    """Scores every entry of a layer's KV cache, (batch, n); higher stays, +inf always stays. `window` is how many
    of the prompt's last queries it reads (0: none)."""

    window: int

    def score(self, inputs: PressInput) -> torch.Tensor: ...
