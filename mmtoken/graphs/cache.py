"""A KV cache whose every layer has a fixed capacity, as a CUDA graph needs: the buffers never move, a device
counter says how many entries each layer holds, and each step's masks are computed from that counter on the device.

Capacities are the entries a layer holds after the prefill (the pruned sizes, different per layer) plus room for
new tokens, rounded up to a multiple of `CAPACITY_STEP`, so requests of nearby sizes share one captured graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import Cache
from transformers.cache_utils import CacheLayerMixin

from mmtoken.engine.masks import columns_mask
from mmtoken.engine.record import CacheRecord

if TYPE_CHECKING:
    from mmtoken.graphs.decode import DecodeStep

CAPACITY_STEP = 64


def capacity_for(entries: int) -> int:
    """The capacity of a layer that holds `entries`: room for at least `CAPACITY_STEP` more, rounded up to a
    multiple of it."""
    return (entries // CAPACITY_STEP + 2) * CAPACITY_STEP


class FixedLayer(CacheLayerMixin):
    """One decoder layer's keys and values, (batch, heads, capacity, head dim), written in place at the device
    counter `filled`; `length` counts the same on the host, for transformers' bookkeeping."""

    is_sliding = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
        super().__init__()
        self.keys, self.values, self.length = keys, values, length
        self.filled = torch.tensor(length, device=keys.device)
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise RuntimeError("a FixedLayer is built full")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple:
        index = self.filled + torch.arange(key_states.shape[2], device=key_states.device)
        self.keys.index_copy_(2, index, key_states)
        self.values.index_copy_(2, index, value_states)
        self.filled.add_(key_states.shape[2])
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.keys.shape[2], 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.keys.shape[2]


class FixedBuffers:
    """The fixed-size keys, values, counters and masks of one decode signature (batch, per-layer capacities,
    dtype, device), which a captured graph reads and writes in place; a request leases them for its decode steps.
    Layers that share an engine record share one mask per step: their valid entries (`rooms`: the record's, then
    True for every entry still to come) up to the entry being written."""

    def __init__(self, like: list[tuple[torch.Tensor, torch.Tensor]], capacities: list[int], groups: list[int],
                 implementation: str) -> None:  # fmt: skip
        self.layers = [
            FixedLayer(keys.new_zeros(*keys.shape[:2], capacity, keys.shape[3]),
                       values.new_zeros(*values.shape[:2], capacity, values.shape[3]), 0)
            for (keys, values), capacity in zip(like, capacities, strict=True)
        ]  # fmt: skip
        self.group_of, self.implementation = groups, implementation
        batch, device = like[0][0].shape[0], like[0][0].device
        self.rooms = {g: torch.ones(batch, capacities[g], dtype=torch.bool, device=device) for g in set(groups)}
        self.slots = {g: torch.arange(capacities[g], device=device) for g in set(groups)}
        self._step_masks: dict[int, torch.Tensor] = {}

    def fill(self, entries: list[tuple[torch.Tensor, torch.Tensor]], valid: dict[int, torch.Tensor]) -> None:
        """Hold `entries` (each layer's keys and values, (batch, heads, n, head dim)), whose validity per group of
        layers is `valid` (batch, n)."""
        for layer, (keys, values) in zip(self.layers, entries, strict=True):
            length = keys.shape[2]
            layer.keys[:, :, :length], layer.values[:, :, :length] = keys, values
            layer.filled.fill_(length)
            layer.length = length
        for group, room in self.rooms.items():
            room.fill_(True)
            room[:, : valid[group].shape[1]] = valid[group]

    def held(self) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], dict[int, torch.Tensor]]:
        """What `fill` takes, of the entries held now."""
        entries = [(layer.keys[:, :, : layer.length], layer.values[:, :, : layer.length]) for layer in self.layers]
        lengths = {group: self.layers[group].length for group in self.rooms}
        return entries, {group: room[:, : lengths[group]] for group, room in self.rooms.items()}

    def begin_step(self) -> None:
        self._step_masks = {}

    def step_mask(self, layer: int, dtype: torch.dtype) -> torch.Tensor:
        """The mask of a one-token step at decoder layer `layer`: its valid entries, up to the one being written."""
        group = self.group_of[layer]
        mask = self._step_masks.get(group)
        if mask is None:
            allowed = self.rooms[group] & (self.slots[group] <= self.layers[group].filled)
            mask = self._step_masks[group] = columns_mask(allowed, self.implementation, dtype)
        return mask

    def full(self) -> bool:
        return any(layer.length == layer.keys.shape[2] for layer in self.layers)

    def advance(self) -> None:
        """One token entered every layer (their device counters moved inside the step)."""
        for layer in self.layers:
            layer.length += 1


def signature(entries: list[tuple[torch.Tensor, torch.Tensor]], groups: list[int], extra: int = 0) -> tuple:
    """The decode signature of a cache holding `entries` (+ `extra` tokens of room): batch, the layers' capacities
    and how they group, dtype, device."""
    keys = entries[0][0]
    capacities = tuple(capacity_for(k.shape[2] + extra) for k, _ in entries)
    return keys.shape[0], capacities, tuple(groups), keys.dtype, keys.device


class FixedCache(Cache):
    """A request's KV cache over the buffers of its lease (`lease.step.buffers`, `lease.key` their signature); what
    transformers and the engine see of them. The lease is an object of its own so that it can be given back when
    the cache is garbage-collected."""

    def __init__(self, lease: Lease) -> None:
        super().__init__(layers=lease.step.buffers.layers)
        self.lease = lease

    @property
    def buffers(self) -> FixedBuffers:
        return self.lease.step.buffers

    def move_to(self, step: DecodeStep, key: tuple) -> None:
        """Move to the buffers of `step` (larger ones, when these are full), taking the entries along."""
        step.buffers.fill(*self.buffers.held())
        self.lease.step, self.lease.key = step, key
        self.layers = step.buffers.layers


@dataclass
class Lease:
    """The decode step (buffers and graph) a request's cache holds now, and its signature."""

    step: DecodeStep
    key: tuple


def groups_of(records: list[CacheRecord]) -> list[int]:
    """For each layer, the first layer that shares its engine record (and so its entries' validity)."""
    first: dict[int, int] = {}
    return [first.setdefault(id(record), layer) for layer, record in enumerate(records)]
