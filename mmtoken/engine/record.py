"""What each decoder layer's KV cache holds, entry by entry, so that decode steps read masks from the cache's own
record and a later stage may compact one layer's cache (`compact`) without the others noticing."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import Cache

from mmtoken.kernels.gather_rows import gather_rows


@dataclass
class CacheRecord:
    """The entries of one layer's KV cache, for every batch row. `slot` (batch, n) is the position of each entry in
    the sequence the language model received, `valid` False for padding and fillers, `complete` (kept on the CPU)
    whether all are valid; the `appended` entries after those are tokens generated since, all valid, at received
    positions `next_slot` on (counted, not stored, so a decode step allocates nothing for them). Layers that hold
    the same entries share one record."""

    slot: torch.Tensor
    valid: torch.Tensor
    complete: bool
    next_slot: int
    appended: int = 0
    _room: torch.Tensor | None = field(default=None, repr=False)

    def append(self, count: int) -> None:
        """`count` tokens entered the cache after those it holds (generated ones, or a streaming prefill's chunk)."""
        self.appended += count

    def entry_slots(self) -> torch.Tensor:
        """(batch, entries): the received position of every entry, the appended ones included."""
        first = self.next_slot
        tail = torch.arange(first, first + self.appended, device=self.slot.device).expand(self.slot.shape[0], -1)
        return torch.cat([self.slot, tail], 1)

    def entries_valid(self) -> torch.Tensor:
        """(batch, entries): whether each entry may be attended to, the appended ones included. A view into a buffer
        with room for the tokens generated later (it doubles when full), so a decode step allocates nothing."""
        entries = self.slot.shape[1] + self.appended
        if self._room is None or self._room.shape[1] < entries:
            self._room = self.valid.new_ones(self.valid.shape[0], 2 * entries)
            self._room[:, : self.valid.shape[1]] = self.valid
        return self._room[:, :entries]

    def gathered(self, keep: torch.Tensor, fillers: torch.Tensor | None = None) -> CacheRecord:
        """The record of entries `keep` (batch, n) of all it holds, those where `fillers` is True made invalid (no
        query sees them); reads the device once, to know whether all are valid."""
        valid = self.entries_valid().gather(1, keep)
        if fillers is not None:
            valid = valid & ~fillers
        slot = self.entry_slots().gather(1, keep)
        return CacheRecord(slot, valid, bool(valid.all()), self.next_slot + self.appended)


def gather_entries(cache: Cache, layer: int, keep: torch.Tensor) -> None:
    """Keep the entries `keep` (batch, n) of `layer`'s keys and values, in that order, freeing the others."""
    entries = cache.layers[layer]
    entries.keys, entries.values = gather_rows(entries.keys, keep), gather_rows(entries.values, keep)
