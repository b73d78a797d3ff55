"""From scores to the indices of the tokens that stay."""

from __future__ import annotations

import torch


def select(
    scores: torch.Tensor,
    candidates: torch.Tensor,
    valid: torch.Tensor,
    keep: torch.Tensor,
    width: int | None = None,
    keep_invalid: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep every valid non-candidate and the `keep[row]` best-scored candidates of each row; a candidate
    scored -inf is never kept, and one scored +inf always is, on top of the `keep[row]` best others. With
    `keep_invalid`, padding and fillers stay too (still invalid), so the set's width depends on its length and
    counts only, not on how much of each row is padding.

    Returns `local` (batch, width), indices into the set in their original order, and their validity. Rows that
    keep fewer than `width` tokens are filled up with invalid tokens (padding first), so the batch stays a
    rectangle that a gather can produce. Pass `width` when it is known, to spare a wait on the GPU.
    """
    batch, length = scores.shape
    ranked = scores.float().masked_fill(~candidates, float("-inf"))
    order = ranked.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(length, device=order.device).expand(batch, -1))
    forced = (ranked == float("inf")).sum(1, keepdim=True)
    chosen = candidates & (rank < keep[:, None] + forced) & (ranked > float("-inf"))
    required = chosen | (~candidates if keep_invalid else valid & ~candidates)
    if width is None:
        width = int(required.sum(1).max())
    local = required.int().argsort(dim=1, descending=True, stable=True)[:, :width].sort(dim=1).values
    return local, (required & valid).gather(1, local)
