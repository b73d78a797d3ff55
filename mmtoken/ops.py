"""Pure tensor operations that the scorers, reducers and the engine share: gathering tokens, summing them into
slots the same way on every run, merging them into targets, following merge chains and grouping patches into grid
cells. They know nothing of methods or models."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mmtoken.kernels.gather_rows import gather_rows

Reduced = tuple[torch.Tensor, torch.Tensor]  # the kept tokens' states and merge weights


def gather_tokens(hidden: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """Tokens `local` (batch, n) of each row of a (batch or 1, length, dim) tensor."""
    return gather_rows(hidden[:, None], local)[:, 0]


def merge_into(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor) -> Reduced:
    """Every token whose `target` (batch, n) is itself becomes the weighted mean of the tokens that name it,
    weighted by `weight` (batch, n; 0 for tokens that count for nothing); a target of -1 merges nowhere.

    Returns the new states and weights of all n tokens (those of tokens that merged away are left as they were).
    A token that absorbs nothing keeps its state bit for bit.
    """
    own = torch.arange(target.shape[1], device=target.device).expand_as(target)
    target = torch.where(target < 0, own, target)
    weight = weight.to(torch.float32)
    # one sum over the weighted states, the weights and a count of members, so the tokens are sorted once
    columns = torch.cat([hidden.float() * weight[..., None], weight[..., None], torch.ones_like(weight)[..., None]], -1)
    summed = scatter_sum(columns, target, target.shape[1])
    sums, totals, members = summed[..., :-2], summed[..., -2], summed[..., -1]
    merged = (sums / totals.clamp(min=torch.finfo(torch.float32).tiny)[..., None]).to(hidden.dtype)
    absorbed = (members > 1) & (totals > 0)
    return torch.where(absorbed[..., None], merged, hidden), torch.where(members > 0, totals, weight)


def scatter_sum(values: torch.Tensor, index: torch.Tensor, slots: int) -> torch.Tensor:
    """(batch, slots, ...) float32: the sum of the `values` (batch, n, ...) that `index` (batch, n; each in [0,
    slots)) sends to each slot, with the same bits on every run. CUDA's `scatter_add` adds in the order its threads
    arrive, so a merge's means, and every choice a method makes on them, vary from run to run; here a slot's sum is
    the difference of two running sums over the values sorted by slot, in float64, whose rounding float32 never
    sees."""
    batch = index.shape[0]
    trailing = values.shape[2:]

    def along(positions: torch.Tensor) -> torch.Tensor:  # (batch, m) -> indices that pick whole rows of values
        return positions.view(*positions.shape, *[1] * len(trailing)).expand(*positions.shape, *trailing)

    order = index.argsort(dim=1, stable=True)
    sorted_index = index.gather(1, order).contiguous()
    running = values.double().gather(1, along(order)).cumsum(1)
    running = torch.cat([running.new_zeros(batch, 1, *trailing), running], dim=1)
    slot = torch.arange(slots, device=index.device, dtype=index.dtype).expand(batch, -1).contiguous()
    ends, starts = (torch.searchsorted(sorted_index, slot, right=right) for right in (True, False))
    return (running.gather(1, along(ends)) - running.gather(1, along(starts))).float()


def compress(target: torch.Tensor) -> torch.Tensor:
    """Follow chains of merges (a merges into b, b into c) along the last axis until every token names a head (or
    -1, where its chain leaves): each step doubles how far a token looks along its chain, so log2(n) steps reach
    every end, with no wait on the host to check."""
    for _ in range(max(target.shape[-1] - 1, 1).bit_length()):
        target = torch.where(target >= 0, target.gather(-1, target.clamp(min=0)), target)
    return target


@dataclass
class GridCells:
    """Square cells of `stride` x `stride` patches within each frame; with `budget` instead, the stride whose
    cell count is nearest to it. Tokens off the grid (text, row separators) are cells of their own."""

    stride: int | None = None
    budget: float | None = None

    def stride_for(self, visual: int) -> int:
        if self.budget is None:
            return self.stride or 2
        if visual == 0:
            return 1  # nothing to pool: a row without visual tokens passes through
        if self.budget > visual:
            raise ValueError(f"pooling: budget {self.budget} exceeds the {visual} visual tokens of this input")
        return max(1, round(math.sqrt(visual / self.budget)))

    def firsts(self, geometry: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """(batch, n): the index of the first token of each token's cell, for (batch, n, 4) `geometry` (media, frame,
        row and column, -1 off the grid) and the (batch, n) visual `candidates` that cells group; every row at once,
        each with its own stride (two reads of the host: the rows' visual counts and the largest cell number)."""
        batch, length = candidates.shape
        strides = [self.stride_for(count) for count in candidates.sum(1).tolist()]
        stride = torch.tensor(strides, device=geometry.device)[:, None]
        media, frame, row, column = geometry.clamp(min=0).unbind(-1)
        row, column = row // stride, column // stride
        frames, rows, columns = (part.amax(1, keepdim=True) + 1 for part in (frame, row, column))
        cell = ((media * frames + frame) * rows + row) * columns + column
        index = torch.arange(length, device=geometry.device).expand(batch, -1)
        own = index + cell.amax(1, keepdim=True) + 1  # tokens off the grid are cells of their own
        cell = torch.where(candidates & (geometry[..., 3] >= 0), cell, own)
        heads = torch.full((batch, int(cell.max()) + 1), length, device=geometry.device)
        return heads.scatter_reduce(1, cell, index, reduce="amin").gather(1, cell)


def gather_last(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`tensor` gathered along its last dimension by `index` (batch, n), whatever its leading dimensions."""
    shape = [1] * (tensor.ndim - 2) + list(index.shape)
    return tensor.gather(-1, index.view(shape).expand(*tensor.shape[:-2], *index.shape))
