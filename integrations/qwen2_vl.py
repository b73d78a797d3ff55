"""Qwen2-VL and Qwen2.5-VL: each image or video is a (t, h, w) grid, read back from its M-RoPE positions."""

from __future__ import annotations

import itertools
from functools import partial

import torch
from torch import nn
from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision
from transformers.vision_utils import get_vision_window_index

from mmtoken.integrations.base import Adapter
from mmtoken.integrations.frames import EncodedFrames
from mmtoken.integrations.vision import module_input, received_attention
from mmtoken.state import IMAGE


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

    def frame_runs(self, inputs: dict, frames: int) -> list[torch.Tensor | EncodedFrames]:
        pixels, grids = inputs["pixel_values_videos"], inputs["video_grid_thw"]  # patches of every video, in order
        merged = self.config.vision_config.spatial_merge_size**2
        pieces, offset = [], 0
        for steps, rows, columns in grids.tolist():
            per_step = rows * columns
            for first in range(0, steps, frames):
                last = min(first + frames, steps)
                media = {"pixel_values_videos": pixels[offset + first * per_step : offset + last * per_step],
                         "video_grid_thw": grids.new_tensor([[last - first, rows, columns]])}  # fmt: skip
                tokens = (last - first) * per_step // merged
                pieces.append(EncodedFrames(tokens, partial(self._frames_features, media, tokens)))
            offset += steps * per_step
        return pieces

    def split_run(self, kind: int, blocks: list[torch.Tensor], positions: torch.Tensor | None) -> list[torch.Tensor]:
        if positions is None:
            raise ValueError("Qwen2-VL needs its M-RoPE position ids to lay out visual tokens")
        row, column = positions[1] - positions[1].min(), positions[2] - positions[2].min()
        frame = torch.arange(len(row)) // int((row.max() + 1) * (column.max() + 1))
        return [torch.stack([frame, row, column], dim=1)]

    @property
    def pixel_tower(self) -> tuple[nn.Module, tuple[int, ...]]:
        return self.model.base_model.visual, ()  # the model reads the merged tokens, no hidden state

    @property
    def segmented_tower(self) -> nn.Module:
        return self.model.base_model.visual

    @property
    def vision_attention(self) -> nn.Module:
        """The last block with full attention over each frame (Qwen2.5-VL windows the others)."""
        blocks = self.model.base_model.visual.blocks
        full = getattr(self.config.vision_config, "fullatt_block_indexes", None)
        return blocks[full[-1] if full else len(blocks) - 1].attn

    def vision_attention_signal(self, module: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
        """Received attention of every patch within its frame, recomputed with the block's rotary embedding."""
        hidden = module_input(args, kwargs)
        query, keys, _ = module.qkv(hidden).reshape(len(hidden), 3, module.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        query, keys = apply_rotary_pos_emb_vision(query, keys, *kwargs["position_embeddings"])
        query, keys = query.transpose(0, 1)[None], keys.transpose(0, 1)[None]
        frames = itertools.pairwise(kwargs["cu_seqlens"].tolist())
        signals = [received_attention(query[..., a:b, :], keys[..., a:b, :], module.scaling) for a, b in frames]
        return torch.cat(signals, dim=1)[0]

    def arrange_vision_signal(self, kind: int, raw: torch.Tensor, arguments: dict) -> torch.Tensor:
        """Mean over each 2 x 2 group the merger fuses into one token; Qwen2.5-VL's tower runs in window order,
        which is undone as its merger output is."""
        vision = self.config.vision_config
        merge = vision.spatial_merge_size
        signal = raw.view(-1, merge**2).mean(1)
        if self.config.model_type == "qwen2_5_vl":
            grid = arguments["image_grid_thw" if kind == IMAGE else "video_grid_thw"]
            window_index, _ = get_vision_window_index(grid, merge, vision.window_size, vision.patch_size)
            signal = signal[torch.argsort(window_index.to(signal.device))]
        return signal
