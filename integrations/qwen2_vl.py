"""Qwen2-VL and Qwen2.5-VL: each image or video is a (t, h, w) grid, read back from its M-RoPE positions."""

from __future__ import annotations

import torch

from mmtoken.engine.state import IMAGE
from mmtoken.integrations.base import Adapter


class Qwen2VLAdapter(Adapter):
    """Qwen2-VL and Qwen2.5-VL: every image or video sits between vision start and end tokens, so a run of
    visual tokens is one item, in raster order over (frame, row, column); rows and columns come from its M-RoPE
    (h, w) positions. Frames are counted, not read from t: Qwen2.5-VL spaces t by time, and close frames share
    one t."""

    model_types = ("qwen2_vl", "qwen2_5_vl")

    def expected_tokens(self, kind: int, inputs: dict) -> int | None:
        grids = inputs.get("image_grid_thw" if kind == IMAGE else "video_grid_thw")
        if grids is None:
            return super().expected_tokens(kind, inputs)
        return int(grids.prod(-1).sum()) // self.config.vision_config.spatial_merge_size**2

    def split_run(self, kind: int, embeddings: torch.Tensor, positions: torch.Tensor | None) -> list[torch.Tensor]:
        if positions is None:
            raise ValueError("Qwen2-VL needs its M-RoPE position ids to lay out visual tokens")
        row, column = positions[1] - positions[1].min(), positions[2] - positions[2].min()
        frame = torch.arange(len(row)) // int((row.max() + 1) * (column.max() + 1))
        return [torch.stack([frame, row, column], dim=1)]
