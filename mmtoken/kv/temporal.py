"""Temporal redundancy: a video's entries that the latest frame already holds leave first."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mmtoken.kv.base import PressInput

_LATEST = 3.0  # above every cosine distance (at most 2): the latest frame of each video stays first


@dataclass
class TemporalRedundancy:
    """InfiniPot-V's temporal-redundancy rule (TaR, Kim et al., arXiv 2506.15745): each visual entry scores the
    cosine distance of its key (averaged over key-value heads) to the key at the same place (row, column) in the
    latest frame of its video, so the entries that the latest frame repeats leave first and the latest frame stays.
    An image is one frame: all of it is latest. Text entries are not scored, tokens off the grid (row separators)
    stay."""

    window: int = 0

    def score(self, inputs: PressInput) -> torch.Tensor:
        on_grid = inputs.visual & (inputs.geometry[..., 3] >= 0)  # row separators (column -1) are not scored
        media, frame, row, column = inputs.geometry.clamp(min=0).unbind(-1)
        rows, columns = int(row.max()) + 1, int(column.max()) + 1
        place = (media * rows + row) * columns + column
        latest = torch.full((place.shape[0], int(media.max()) + 1), -1, dtype=frame.dtype, device=frame.device)
        latest = latest.scatter_reduce(1, media, frame.masked_fill(~on_grid, -1), "amax")
        is_latest = on_grid & (frame == latest.gather(1, media))
        unused = int(place.max()) + 1  # where the entries that are not latest write, so they overwrite nothing
        table = torch.zeros(place.shape[0], unused + 1, dtype=torch.long, device=place.device)
        entry = torch.arange(place.shape[1], device=place.device).expand_as(place)
        table = table.scatter(1, place.masked_fill(~is_latest, unused), entry)
        reference = table.gather(1, place)  # (batch, n): the latest frame's entry at each entry's place
        keys = F.normalize(inputs.keys.float(), dim=-1)
        referenced = keys.gather(2, reference[:, None, :, None].expand_as(keys))
        distance = 1 - (keys * referenced).sum(-1).mean(1)
        return torch.where(is_latest | ~on_grid, _LATEST, distance)
