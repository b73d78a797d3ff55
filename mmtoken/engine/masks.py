"""Attention masks for a layer that sees fewer tokens than the language model received.

The model builds its mask once, over the sequence it received. A layer behind a reduction needs that mask
restricted to its own tokens: rows and columns at prefill, columns at decode. Fillers (invalid tokens that keep
the rows of a batch equally long) are hidden from every query but their own, so no row is ever fully masked.
Masks come in three shapes: None (sdpa's `is_causal`, nothing to hide), 2-D padding masks (flash attention) and
4-D masks, boolean (sdpa) or additive (eager).
"""

from __future__ import annotations

import torch


def _gather_keys(mask: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    if mask.ndim == 2:
        return mask.gather(1, columns)
    mask = mask.expand(columns.shape[0], *mask.shape[1:])
    return mask.gather(3, columns[:, None, None, :].expand(-1, mask.shape[1], mask.shape[2], -1))


def _hide(mask: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """Hide the key columns where `hidden` (batch, keys) is True."""
    if mask.ndim == 2:
        return mask & ~hidden.to(mask.device)
    hidden = hidden[:, None, None, :]
    if mask.dtype == torch.bool:
        return mask & ~hidden
    return mask.masked_fill(hidden, torch.finfo(mask.dtype).min)


def _unhide_diagonal(mask: torch.Tensor, fillers: torch.Tensor) -> torch.Tensor:
    if mask.ndim == 2:
        return mask
    diagonal = torch.diag_embed(fillers)[:, None]
    if mask.dtype == torch.bool:
        return mask | diagonal
    return mask.masked_fill(diagonal, 0.0)


def _causal(fillers: torch.Tensor, queries: int, implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """A fresh mask for when the model passed none: causal over the last `queries` keys, fillers hidden."""
    batch, keys = fillers.shape
    if "flash" in implementation:
        return ~fillers
    query_index = torch.arange(keys - queries, keys, device=fillers.device)
    allowed = torch.arange(keys, device=fillers.device)[None, :] <= query_index[:, None]
    allowed = allowed[None, None].expand(batch, 1, queries, keys)
    if implementation == "eager":
        zero = torch.zeros((), dtype=dtype, device=fillers.device)
        return torch.where(allowed, zero, torch.finfo(dtype).min)
    return allowed


def prefill_mask(
    mask: torch.Tensor | None,
    slot: torch.Tensor,
    valid: torch.Tensor,
    complete: bool,
    implementation: str,
    dtype: torch.dtype,
) -> torch.Tensor | None:
    """The prefill mask for the tokens at `slot` (batch, n) of the model's sequence; `complete` says that no
    token is invalid."""
    fillers = ~valid
    if mask is None:
        if complete:
            return None
        mask = _causal(fillers, slot.shape[1], implementation, dtype)
        return _unhide_diagonal(_hide(mask, fillers) if mask.ndim == 4 else mask, fillers)
    if mask.ndim == 4:
        mask = mask.expand(slot.shape[0], *mask.shape[1:])
        mask = mask.gather(2, slot[:, None, :, None].expand(-1, mask.shape[1], -1, mask.shape[3]))
    mask = _gather_keys(mask, slot)
    if complete:
        return mask
    return _unhide_diagonal(_hide(mask, fillers), fillers)


def decode_mask(
    valid: torch.Tensor | None,
    entries: int,
    queries: int,
    implementation: str,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor | None:
    """The mask of a decode step's `queries` (the newest of a layer's `entries`) over the layer's cache, from the
    cache's record: `valid` (batch, entries), or None where every entry is valid. None where nothing needs hiding
    (flash attention aligns its causal mask to the newest keys by itself)."""
    if valid is None:
        if queries == 1 or "flash" in implementation:
            return None
        return _causal(torch.zeros(1, entries, dtype=torch.bool, device=device), queries, implementation, dtype)
    fillers = ~valid
    mask = _causal(fillers, queries, implementation, dtype)
    return mask if mask.ndim == 2 else _hide(mask, fillers)


def columns_mask(valid: torch.Tensor, implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """The mask of one query over keys whose validity is `valid` (batch, keys)."""
    if "flash" in implementation:
        return valid
    if implementation == "eager":
        zero = torch.zeros((), dtype=dtype, device=valid.device)
        return torch.where(valid, zero, torch.finfo(dtype).min)[:, None, None, :]
    return valid[:, None, None, :]
