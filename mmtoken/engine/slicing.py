"""What a decoder layer behind a cut receives instead of the model's own arguments: the rotary embeddings and the
attention mask of the tokens alive there (rotary phases are the original ones, gathered, never recomputed).

The model builds its mask and rotary tables once per call, over the sequence it received. At prefill a stretch of
layers that shares one token set gets them gathered once and reused by its other layers; at decode each layer's
mask comes from the record of what its cache holds (for one new token, a view of the record's buffer), never from
the cache's length.
"""

from __future__ import annotations

import torch

from mmtoken.engine.masks import columns_mask, decode_mask, prefill_mask
from mmtoken.engine.request import Request
from mmtoken.ops import gather_tokens


def slice_prefill(request: Request, index: int, kwargs: dict, implementation: str) -> None:
    """Hand decoder layer `index` the mask and rotary embeddings of its stretch's tokens, at prefill."""
    start = request.call.stretch_of(index)
    if start == 0:
        return
    tokens, mask = request.call.sets[start], kwargs.get("attention_mask")
    cached = request.prefill.slices.get(start)
    if cached is None or cached[0] is not mask:
        cos, sin = kwargs["position_embeddings"]
        sliced_mask = prefill_mask(mask, tokens.slot, tokens.valid, tokens.complete, implementation, cos.dtype)
        cached = (mask, sliced_mask, (gather_tokens(cos, tokens.slot), gather_tokens(sin, tokens.slot)))
        request.prefill.slices[start] = cached
    kwargs["attention_mask"], kwargs["position_embeddings"] = cached[1], cached[2]
    kwargs["position_ids"] = None


def slice_decode(request: Request, index: int, hidden: torch.Tensor, kwargs: dict, implementation: str) -> None:
    """Hand decoder layer `index` the mask of a decode step over the entries its cache's record says it holds."""
    if request.step_masks is not None:
        kwargs["attention_mask"] = request.step_masks(index, hidden.dtype)
        return
    record = request.records[index]
    if record is request.records[0]:
        return  # it holds what the model received, which the model's own mask covers
    valid = None if record.complete else record.entries_valid()
    if hidden.shape[1] == 1:
        mask = None if valid is None else columns_mask(valid, implementation, hidden.dtype)
    else:
        entries = record.slot.shape[1] + record.appended
        mask = decode_mask(valid, entries, hidden.shape[1], implementation, hidden.dtype, hidden.device)
    kwargs["attention_mask"] = mask


def shortened_padding_mask(request: Request) -> torch.Tensor:
    """At decode, the 2-D padding mask over the entries the first layer's cache holds of a prompt that a cut before
    the language model shortened or a press of the first layer compacted, plus the tokens generated since (a view
    of the first layer's cache record)."""
    return request.records[0].entries_valid()
