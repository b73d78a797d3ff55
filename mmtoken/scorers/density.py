"""Density-peak clustering with k nearest neighbours (DPC-KNN), as HoliTom merges static tokens."""

from __future__ import annotations

import math

import torch

NEIGHBOURS = 7


def density_peak_targets(features: torch.Tensor, count: int) -> torch.Tensor:
    """Targets (positions in the m rows of `features`) that merge the rows into `count` clusters: the centers are the
    rows whose local density (from their nearest neighbours) times their distance to any denser row is highest, and
    every other row joins its nearest center. Equal densities are ordered by position (HoliTom adds random noise)."""
    length = len(features)
    own = torch.arange(length, device=features.device)
    if count >= length:
        return own
    if count <= 0:
        return torch.full_like(own, -1)
    distance = torch.cdist(features.float(), features.float()) / math.sqrt(features.shape[-1])
    nearest = distance.topk(min(NEIGHBOURS, count), dim=1, largest=False).values
    density = (-(nearest**2).mean(1)).exp()
    rank = torch.empty_like(own).scatter_(0, density.argsort(stable=True), own)  # ties broken by position
    denser = rank[None, :] > rank[:, None]
    separation = torch.where(denser, distance, distance.max()).amin(1)
    centers = (separation * density).argsort(descending=True, stable=True)[:count]
    target = centers[distance[:, centers].argmin(1)]
    target[centers] = centers
    return target
