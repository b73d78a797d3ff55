"""What each decoder layer's KV cache holds, entry by entry, so that decode steps read masks from the cache's own
record and a later stage may compact one layer's cache (`compact`) without the others noticing."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import Cache


@dataclass
class CacheRecord:
    """The entries of one layer's KV cache, for every batch row: `slot`, the position of each entry in the sequence
    the language model received (the prompt first, then the tokens generated since, numbered on), `valid`, False
    for padding and fillers, and `complete`, kept on the CPU: whether all are valid. Layers that hold the same
    entries share one record."""

    slot: torch.Tensor
    valid: torch.Tensor
    complete: bool

    def extended(self, first: int, count: int) -> CacheRecord:
        """The record after `count` generated tokens entered, at received positions `first` on."""
        batch = self.slot.shape[0]
        new = torch.arange(first, first + count, device=self.slot.device).expand(batch, -1)
        valid = torch.cat([self.valid, self.valid.new_ones(batch, count)], 1)
        return CacheRecord(torch.cat([self.slot, new], 1), valid, self.complete)

    def gathered(self, keep: torch.Tensor) -> CacheRecord:
        """The record of entries `keep` (batch, n); reads the device once, to know whether all are valid."""
        valid = self.valid.gather(1, keep)
        return CacheRecord(self.slot.gather(1, keep), valid, bool(valid.all()))


def gather_entries(cache: Cache, layer: int, keep: torch.Tensor) -> None:
    """Keep the entries `keep` (batch, n) of `layer`'s keys and values, in that order, freeing the others."""
    entries = cache.layers[layer]
    index = keep[:, None, :, None].expand(-1, entries.keys.shape[1], -1, entries.keys.shape[3])
    entries.keys, entries.values = entries.keys.gather(2, index), entries.values.gather(2, index)
