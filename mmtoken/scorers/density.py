"""Density-peak clustering with k nearest neighbours (DPC-KNN), as HoliTom merges static tokens: many small sets
at once (one per frame), each padded to the largest."""

from __future__ import annotations

import math

import torch

NEIGHBOURS = 7


def density_peak_groups(features: torch.Tensor, valid: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Targets that merge each set's rows into `counts` clusters, for sets `features` (sets, m, dim) whose rows are
    those where `valid` (sets, m) is True: a target is a row's position in its set, -1 for a row that leaves (all of
    a set whose count is 0, and the padding). The centers are the rows whose local density (from their nearest
    neighbours) times their distance to any denser row is highest, and every other row joins its nearest center. Equal
    densities are ordered by position (HoliTom adds random noise). A set whose count reaches its size stays whole."""
    sets, width, dim = features.shape
    own = torch.arange(width, device=features.device).expand(sets, width)
    if width == 0:
        return own.clone()
    sizes = valid.sum(1)
    pair = valid[:, :, None] & valid[:, None, :]
    distance = torch.cdist(features.float(), features.float()) / math.sqrt(dim)
    neighbours = counts.clamp(1, NEIGHBOURS)
    nearest = distance.masked_fill(~pair, math.inf).topk(min(NEIGHBOURS, width), dim=2, largest=False).values
    used = torch.arange(nearest.shape[2], device=features.device) < neighbours[:, None, None]
    density = (-(nearest.masked_fill(~used, 0) ** 2).sum(2) / neighbours[:, None]).exp()
    density = density.masked_fill(~valid, -math.inf)  # padding ranks below every row: never denser
    rank = torch.empty_like(own).scatter_(1, density.argsort(dim=1, stable=True), own)  # ties broken by position
    denser = (rank[:, None, :] > rank[:, :, None]) & pair
    farthest = distance.masked_fill(~pair, -math.inf).amax((1, 2))
    separation = torch.where(denser, distance, farthest[:, None, None]).amin(2)
    ranked = (separation * density).masked_fill(~valid, -math.inf).argsort(dim=1, descending=True, stable=True)
    is_center = torch.arange(width, device=features.device) < counts[:, None]  # along `ranked`
    to_centers = distance.gather(2, ranked[:, None, :].expand(-1, width, -1)).masked_fill(~is_center[:, None], math.inf)
    target = ranked.gather(1, to_centers.argmin(2))
    center = torch.zeros_like(valid).scatter_(1, ranked, is_center)
    target = torch.where(center | (counts >= sizes)[:, None], own, target)
    return target.masked_fill(~valid | (counts <= 0)[:, None], -1)


def density_peak_targets(features: torch.Tensor, count: int) -> torch.Tensor:
    """`density_peak_groups` of one set, the m rows of `features`, into `count` clusters."""
    valid = torch.ones(features.shape[0], dtype=torch.bool, device=features.device)
    counts = torch.tensor([count], device=features.device)
    return density_peak_groups(features[None], valid[None], counts)[0]
