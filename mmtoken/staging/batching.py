"""Requests into one batch: their processed inputs left-padded into one, their encodings concatenated in the same
order, and which requests can share a batch at all."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.utils import ModelOutput

from mmtoken.encoding import Encoded

_ROW_INPUTS = ("input_ids", "attention_mask", "mm_token_type_ids")


def batch_key(inputs: dict) -> tuple:
    """Requests with equal keys can share a batch: the same inputs, their media tensors alike past the first
    dimension (which concatenates)."""
    return tuple(
        (name, tuple(value.shape[1:]) if torch.is_tensor(value) else None)
        for name, value in sorted(inputs.items())
        if name not in _ROW_INPUTS
    )


def grouped(jobs: Sequence) -> list[list]:
    """`jobs` (anything with processed `inputs`) in groups that can share a batch, each in arrival order, the groups
    in the order of their first job."""
    groups: dict[tuple, list] = {}
    for job in jobs:
        groups.setdefault(batch_key(job.inputs), []).append(job)
    return list(groups.values())


def collate(rows: Sequence[dict], pad_id: int) -> dict:
    """One left-padded batch of single-row processed inputs: token rows padded with `pad_id` (mask 0), every other
    tensor concatenated along its first dimension."""
    width = max(row["input_ids"].shape[1] for row in rows)
    batch = {}
    for name in rows[0]:
        values = [row[name] for row in rows]
        if name in _ROW_INPUTS:
            fill = pad_id if name == "input_ids" else 0
            values = [torch.nn.functional.pad(value, (width - value.shape[1], 0), value=fill) for value in values]
        batch[name] = torch.cat(values)
    if "attention_mask" not in batch:
        batch["attention_mask"] = (batch["input_ids"] != pad_id).long()
    return batch


def _joined(values: list[object]) -> object:
    first = values[0]
    if torch.is_tensor(first):
        return torch.cat(values)
    if isinstance(first, ModelOutput):
        return type(first)(**{name: _joined([value[name] for value in values]) for name in first})
    if isinstance(first, (list, tuple)):
        return type(first)(item for value in values for item in value)
    return first


def collate_encoded(encodings: Sequence[Encoded]) -> Encoded:
    """The encodings of a batch's requests as one, in the batch's order (what the model's own encoding of the
    collated inputs would give)."""
    features = {kind: _joined([encoded.features[kind] for encoded in encodings]) for kind in encodings[0].features}
    kinds = dict.fromkeys(kind for encoded in encodings for kind in encoded.signals)
    signals = {kind: [signal for encoded in encodings for signal in encoded.signals.get(kind, [])] for kind in kinds}
    return Encoded(features, signals)
