"""HoliTom's temporal merging: within segments of frames, the tokens that stay the same merge into their first
frame; the segments are chosen for the whole video at once, to remove the most tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mmtoken.ops import compress
from mmtoken.scorers.base import ScoreInput
from mmtoken.scorers.groups import Grouping, row_targets
from mmtoken.state import VIDEO

_BISECTION_STEPS = 30


def video_grids(geometry: torch.Tensor, kinds: torch.Tensor) -> list[torch.Tensor]:
    """The grid tokens of each video among one row's tokens (`geometry` n x 4, `kinds` n), as positions arranged
    (frames, tokens per frame); tokens off the grid (row separators) are left out."""
    on_grid = (geometry[:, 3] >= 0) & (kinds == VIDEO)
    grids = []
    for media in geometry[on_grid, 0].unique().tolist():
        positions = (on_grid & (geometry[:, 0] == media)).nonzero().squeeze(1)
        grids.append(positions.view(int(geometry[positions, 1].max()) + 1, -1))
    return grids


def adjacent_similarity(frames: torch.Tensor) -> torch.Tensor:
    """(frames - 1, tokens): cosine similarity of each token with the token at its place in the next frame."""
    unit = F.normalize(frames.float(), dim=-1)
    return (unit[:-1] * unit[1:]).sum(-1).clamp(-1, 1)


def removable(similar: torch.Tensor) -> torch.Tensor:
    """(frames, frames): how many tokens merging frames s..e removes, for every segment [s, e]: the places whose
    token stays similar across all of them, times e - s. `similar` (frames - 1, tokens) compares adjacent frames."""
    breaks = F.pad((~similar).int().cumsum(0), (0, 0, 1, 0))  # (frames, tokens): dissimilar steps before frame k
    lasting = (breaks[None] == breaks[:, None]).sum(-1)  # [s, e]: places with no dissimilar step from s to e
    frame = torch.arange(len(breaks), device=similar.device)
    return (lasting * (frame[None] - frame[:, None])).triu(diagonal=1)


def segments(similar: torch.Tensor) -> list[tuple[int, int]]:
    """The split of the frames into segments [start, end] that removes the most tokens (dynamic programming over
    the whole video, HoliTom's global redundancy-aware segmentation); on ties the shorter segment wins."""
    counts = removable(similar).tolist()
    best, begin = [0], []
    for end in range(len(counts)):
        value, start = max((best[start] + counts[start][end], start) for start in range(end + 1))
        best.append(value)
        begin.append(start)
    spans, end = [], len(counts) - 1
    while end >= 0:
        spans.append((begin[end], end))
        end = begin[end] - 1
    return spans[::-1]


def temporal_targets(grid: torch.Tensor, similar: torch.Tensor, target: torch.Tensor) -> int:
    """Within each segment of the video `grid` (frames x tokens positions), point the tokens that stay similar to
    their place's token in the segment's first frame; returns how many tokens merge away. Every segment at once."""
    spans = torch.tensor(segments(similar), device=grid.device)
    first, last = spans.repeat_interleave(spans[:, 1] - spans[:, 0] + 1, dim=0, output_size=len(grid)).unbind(1)
    breaks = F.pad((~similar).int().cumsum(0), (0, 0, 1, 0))  # (frames, tokens): dissimilar steps before frame k
    lasting = breaks[last] == breaks[first]  # the place stays similar across its frame's whole segment
    merging = lasting & (torch.arange(len(grid), device=grid.device) > first)[:, None]
    target[grid[merging]] = grid[first][merging]
    return int(merging.sum())


@dataclass
class TemporalMerge(Grouping):
    """HoliTom's first stage (arXiv 2505.21334) on each video of a row: adjacent frames are compared token by token
    (cosine of the states at the same place), the frames are segmented to remove the most tokens, and in each
    segment the tokens similar across all its frames above `threshold` merge into their first frame. With `count`
    instead, the highest threshold whose merging leaves at most `count` visual tokens (bisection)."""

    threshold: float | None = None
    count: float | None = None
    decides_count = True

    def group(self, inputs: ScoreInput) -> torch.Tensor:
        def assign(row: int, index: torch.Tensor) -> torch.Tensor:
            # the decisions run on the CPU: they are many small steps, each a kernel launch and a sync on a GPU
            grids = video_grids(inputs.geometry[row, index].cpu(), inputs.kinds[row, index].cpu())
            if not grids:
                raise ValueError(f"temporal: row {row} holds no video; it merges tokens across video frames")
            hidden = inputs.hidden[row, index]
            similarity = [adjacent_similarity(hidden[grid.to(hidden.device)]).cpu() for grid in grids]

            def merged(threshold: float) -> tuple[torch.Tensor, int]:
                target = torch.arange(len(index))
                pairs = zip(grids, similarity, strict=True)
                removed = sum(temporal_targets(grid, similar > threshold, target) for grid, similar in pairs)
                return target, len(index) - removed

            threshold = self.threshold
            if self.count is not None:
                low, high = -1.0, 1.0
                for _ in range(_BISECTION_STEPS):
                    middle = (low + high) / 2
                    low, high = (middle, high) if merged(middle)[1] <= self.count else (low, middle)
                threshold = low
            return compress(merged(threshold)[0]).to(index.device)

        return row_targets(inputs, assign)
