"""HoliTom's outer-LLM merging: temporal merging, then spatial reduction of what is left."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mmtoken.ops import compress, merge_into
from mmtoken.scorers.base import ScoreInput
from mmtoken.scorers.density import density_peak_groups
from mmtoken.scorers.groups import Grouping, row_targets
from mmtoken.scorers.temporal import adjacent_similarity, temporal_targets, video_grids


def _by_frame(members: torch.Tensor, frame: torch.Tensor, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(frames, m) positions of the `members` (a mask over the row's tokens) of each frame, in order, padded with
    -1 to the frame with the most, where `frame` numbers each token's frame; and the mask of the real ones."""
    positions = members.nonzero().squeeze(1)
    owner = frame[positions]
    sizes = torch.bincount(owner, minlength=frames)
    width = int(sizes.max()) if len(positions) else 0
    start = torch.cumsum(sizes, 0) - sizes
    order = owner.argsort(stable=True)
    place = torch.arange(len(positions), device=frame.device) - start[owner[order]]
    index = torch.full((frames, width), -1, dtype=torch.long, device=frame.device)
    index[owner[order], place] = positions[order]
    return index, index >= 0


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
    most, and the rest leave. Images are frames of dynamic tokens only; row separators stay. Every frame's clusters
    and ranking run at once (`density_peak_groups`)."""
    own = torch.arange(len(features), device=features.device)
    target = own.clone()
    for grid in video_grids(geometry, kinds):
        temporal_targets(grid, adjacent_similarity(features[grid]) > threshold, target)
    merged_away = target != own
    heads = torch.zeros_like(merged_away).scatter_(0, target[merged_away], True)
    merged = merge_into(features[None], weight[None], target[None])[0][0]
    on_grid = geometry[:, 3] >= 0
    media, frame = geometry[:, 0].clamp(min=0), geometry[:, 1].clamp(min=0)
    frame = torch.unique(media * (int(frame.max()) + 1) + frame, return_inverse=True)[1]
    frames = int(frame.max()) + 1
    items = torch.bincount(media[on_grid], minlength=int(media.max()) + 1).double()
    left = torch.bincount(media[on_grid & ~merged_away], minlength=len(items)).double()
    share = (ratio * items / left.clamp(min=1)).clamp(max=1.0)
    frame_share = torch.zeros(frames, dtype=torch.float64, device=features.device)
    frame_share[frame[on_grid]] = share[media[on_grid]]

    static, is_static = _by_frame(on_grid & heads, frame, frames)
    holding = is_static.any(1).nonzero().squeeze(1)  # the first frames of segments
    static, is_static = static[holding], is_static[holding]
    counts = torch.round(is_static.sum(1) * frame_share[holding]).long()
    clusters = density_peak_groups(merged[static.clamp(min=0)], is_static, counts)
    named = torch.where(clusters >= 0, static.gather(1, clusters.clamp(min=0)), -1)
    target[static[is_static]] = named[is_static]

    dynamic, is_dynamic = _by_frame(on_grid & ~heads & ~merged_away, frame, frames)
    scores = signal[dynamic.clamp(min=0)].float().masked_fill(~is_dynamic, -math.inf)
    ranked = dynamic.gather(1, scores.argsort(dim=1, descending=True, stable=True))
    kept = torch.ceil(is_dynamic.sum(1) * frame_share)
    leaving = (torch.arange(ranked.shape[1], device=features.device) >= kept[:, None]) & (ranked >= 0)
    target[ranked[leaving]] = -1
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
