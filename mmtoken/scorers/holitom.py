"""HoliTom's outer-LLM merging: temporal merging, then spatial reduction of what is left."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mmtoken.ops import compress, merge_into
from mmtoken.scorers.base import ScoreInput
from mmtoken.scorers.density import density_peak_targets
from mmtoken.scorers.groups import Grouping, row_targets
from mmtoken.scorers.temporal import adjacent_similarity, temporal_targets, video_grids


def holitom_targets(
    features: torch.Tensor,
    weight: torch.Tensor,
    signal: torch.Tensor,
    geometry: torch.Tensor,
    kinds: torch.Tensor,
    ratio: float,
    threshold: float,
) -> torch.Tensor:
    """Targets for one row's visual tokens (`features` n x dim, merge `weight`, vision `signal`, `geometry`,
    `kinds`). Each video is segmented and its static tokens (similar above `threshold` across a segment) merge into
    the segment's first frame (`temporal_targets`). Of what is left of each media item, a share is kept such that
    the item keeps `ratio` of its tokens in all: per segment, the merged static tokens merge further into that share
    of density-peak clusters; per frame, that share of the dynamic tokens stays, those the vision encoder attends to
    most, and the rest leave. Images are frames of dynamic tokens only; row separators stay."""
    own = torch.arange(len(features), device=features.device)
    target = own.clone()
    for grid in video_grids(geometry, kinds):
        temporal_targets(grid, adjacent_similarity(features[grid]) > threshold, target)
    merged_away = target != own
    heads = torch.zeros_like(merged_away).scatter_(0, target[merged_away], True)
    merged = merge_into(features[None], weight[None], target[None])[0][0]
    on_grid = geometry[:, 3] >= 0
    for media in geometry[on_grid, 0].unique().tolist():
        item = on_grid & (geometry[:, 0] == media)
        share = min(ratio * int(item.sum()) / int((item & ~merged_away).sum()), 1.0)
        for frame in geometry[item, 1].unique().tolist():
            in_frame = item & (geometry[:, 1] == frame)
            static = (in_frame & heads).nonzero().squeeze(1)
            clusters = density_peak_targets(merged[static], round(len(static) * share))
            target[static] = torch.where(clusters >= 0, static[clusters.clamp(min=0)], -1)
            dynamic = (in_frame & ~heads & ~merged_away).nonzero().squeeze(1)
            ranked = dynamic[signal[dynamic].argsort(descending=True, stable=True)]
            target[ranked[math.ceil(len(dynamic) * share) :]] = -1
    return compress(target)


@dataclass
class HoliTomMerge(Grouping):
    """HoliTom's outer-LLM stage (Shao et al., arXiv 2505.21334) on each row: see `holitom_targets`; each row keeps
    `ratio` of its grid tokens, or about `count` of them. How many tokens stay depends on the video, so the engine
    counts them."""

    threshold: float
    ratio: float | None = None
    count: float | None = None
    decides_count = True

    def group(self, inputs: ScoreInput) -> torch.Tensor:
        def assign(row: int, index: torch.Tensor) -> torch.Tensor:
            on_grid = int((inputs.geometry[row, index, 3] >= 0).sum())
            ratio = self.ratio if self.count is None else min(self.count / max(on_grid, 1), 1.0)
            return holitom_targets(
                inputs.hidden[row, index],
                inputs.weight[row, index],
                inputs.vision_signal[row, index],
                inputs.geometry[row, index],
                inputs.kinds[row, index],
                ratio,
                self.threshold,
            )

        return row_targets(inputs, assign)
