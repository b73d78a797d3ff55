"""Rows of requests prefilled apart, decoded as one batch (continuous batching): their KV caches joined row by row,
each layer left-padded to the longest row, and the records of a patched model's requests joined with them, so
that each row's decode steps see exactly the entries its own cache held.

Every row is first stripped of the columns it leads with and never attends to (its own left padding, or the
padding of a batch it was in), so a batch that rows leave or join does not keep growing. The received positions
of a row's entries (`CacheRecord.slot`) are renumbered into the joined batch's first layers, which every row
shares."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import Cache, DynamicCache

from mmtoken.engine.record import CacheRecord
from mmtoken.engine.request import Request, give_to, request_of
from mmtoken.state import TEXT, CallState


@dataclass
class Rows:
    """Some rows of a decoding batch: its KV `cache`, its 2-D `seen` mask (batch, tokens: which of the tokens the
    rows have been given are real, as `generate` passes it), and the batch indices of the rows."""

    cache: Cache
    seen: torch.Tensor
    rows: list[int]


def _leading(valid: torch.Tensor) -> list[int]:
    """How many columns each row of `valid` (batch, n) leads with that are False (n for a row that is all False)."""
    return torch.where(valid.any(1), valid.int().argmax(1), valid.shape[1]).tolist()


def _left_padded(pieces: list[torch.Tensor], dim: int, value: float | bool = 0) -> torch.Tensor:
    """`pieces` (each with a leading batch dimension of 1) padded on the left of `dim` to the longest, stacked."""
    width = max(piece.shape[dim] for piece in pieces)
    padded = []
    for piece in pieces:
        pad = [0, 0] * (piece.ndim - 1 - dim) + [width - piece.shape[dim], 0]
        padded.append(F.pad(piece, pad, value=value))
    return torch.cat(padded)


def _refuse(request: Request) -> None:
    if request.in_prefill:
        raise ValueError("joining rows: a request is still in its prefill")
    if request.step_masks is not None:
        raise ValueError("joining rows: caches of fixed sizes (cuda_graphs) decode as the batch they were prefilled in")
    if request.attention_sums:
        raise ValueError("joining rows: a method that evicts while decoding (h2o) keeps per-row attention sums; "
                         "it decodes as the batch it was prefilled in")  # fmt: skip


def join_rows(parts: Sequence[Rows]) -> tuple[Cache, torch.Tensor]:
    """One decoding batch of the rows of `parts`, in order: its KV cache (with a joined `Request` where the model is
    patched) and its `seen` mask. Left-pads every layer to its longest row; the padding is never attended to."""
    if any(layer.is_sliding for part in parts for layer in part.cache.layers):
        raise ValueError("joining rows: a sliding-window cache crops each row on its own; it decodes as prefilled")
    requests = [request_of(part.cache) for part in parts]
    patched = requests[0] is not None
    if any((request is not None) != patched for request in requests):
        raise ValueError("joining rows: caches of a patched and an unpatched model")
    for request in requests:
        if request is not None:
            _refuse(request)
    picked = [(part, request, row) for part, request in zip(parts, requests, strict=True) for row in part.rows]
    seen_lead = {id(part): _leading(part.seen) for part in parts}
    seen = _left_padded([part.seen[row : row + 1, seen_lead[id(part)][row] :] for part, _, row in picked], 1, 0)

    depth = len(parts[0].cache.layers)
    cache, leads, known = DynamicCache(), [], {}  # layers that share a record share its leads: one host read each
    for layer in range(depth):
        lead = {}
        for part, request in zip(parts, requests, strict=True):
            record = request.records[layer] if patched else None
            key = (id(part), id(record))
            if key not in known:
                known[key] = _leading(part.seen if record is None else record.entries_valid())
            lead[id(part)] = known[key]
        leads.append(lead)
        pieces = [(part.cache.layers[layer], row, lead[id(part)][row]) for part, _, row in picked]
        keys = _left_padded([entries.keys[row : row + 1, :, start:] for entries, row, start in pieces], 2)
        values = _left_padded([entries.values[row : row + 1, :, start:] for entries, row, start in pieces], 2)
        cache.update(keys, values, layer)
    if patched:
        records = _joined_records(picked, leads, depth)
        give_to(cache, _joined_request(picked, seen_lead, records))
    return cache, seen


def _joined_records(picked: list[tuple[Rows, Request, int]], leads: list[dict], depth: int) -> list[CacheRecord]:
    first = [request.records[0] for _, request, _ in picked]
    width = max(record.slot.shape[1] + record.appended - leads[0][id(part)][row]
                for record, (part, _, row) in zip(first, picked, strict=True))  # fmt: skip
    joined: dict[tuple[int, ...], CacheRecord] = {}
    records = []
    for layer in range(depth):
        key = tuple(id(request.records[layer]) for _, request, _ in picked)
        if key not in joined:
            slots, valids = [], []
            for part, request, row in picked:
                record, lead, lead0 = request.records[layer], leads[layer][id(part)][row], leads[0][id(part)][row]
                own0 = request.records[0]
                shift = width - (own0.slot.shape[1] + own0.appended - lead0) - lead0
                slots.append(record.entry_slots()[row : row + 1, lead:] + shift)
                valids.append(record.entries_valid()[row : row + 1, lead:])
            valid = _left_padded(valids, 1, False)
            joined[key] = CacheRecord(_left_padded(slots, 1, 0), valid, bool(valid.all()), width)
        records.append(joined[key])
    return records


def _joined_request(picked: list[tuple[Rows, Request, int]], seen_lead: dict, records: list[CacheRecord]) -> Request:
    """The request of the joined rows as decode steps read it: its `call` covers every token each row was given
    (`prompt_length` is the joined `seen` mask's width), its records are the joined ones."""
    kinds, padding = [], []
    for part, request, row in picked:
        call, lead = request.call, seen_lead[id(part)][row]
        given = torch.cat([call.kinds[row], call.kinds.new_full((request.generated,), TEXT)])[lead:]
        kinds.append(given[None])
        padding.append(~part.seen[row : row + 1, lead:].bool())
    call = CallState(
        _left_padded(kinds, 1, TEXT),
        _left_padded(padding, 1, True),
        [request.call.text_counts[row] for _, request, row in picked],
        [request.call.visual_counts[row] for _, request, row in picked],
    )
    shortened = any(request.shortened for _, request, _ in picked)
    return Request(call, None, shortened=shortened, records=records)
