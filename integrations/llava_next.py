"""LLaVA-NeXT and LLaVA-OneVision: a base grid plus an any-resolution grid whose rows end in `image_newline`."""

from __future__ import annotations

import math
from functools import partial

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from mmtoken.integrations.base import Adapter, raster
from mmtoken.integrations.frames import EncodedFrames
from mmtoken.integrations.vision import TowerAttention, select_tower_tokens
from mmtoken.state import IMAGE


class LlavaNextAdapter(TowerAttention, Adapter):
    """LLaVA-NeXT and LLaVA-OneVision. An image is the base image's square grid (frame 0), then the unpadded
    high-resolution grid (frame 1) with an `image_newline` token closing each row (column -1). A OneVision
    video is its frames pooled 2 x 2, closed by one `image_newline`. Newlines are found by their embedding."""

    model_types = ("llava_next", "llava_onevision")

    @property
    def _side(self) -> int:
        vision = self.config.vision_config
        return vision.image_size // vision.patch_size

    @property
    def frame_pooling(self) -> torch.nn.Module | None:
        return self.model.base_model if self.config.model_type == "llava_onevision" else None

    def split_run(self, kind: int, blocks: list[torch.Tensor], positions: torch.Tensor | None) -> list[torch.Tensor]:
        line = self.model.model.image_newline
        newline = torch.cat([(block == line.to(block.dtype)).all(-1).cpu() if torch.is_tensor(block)
                             else torch.zeros(len(block), dtype=torch.bool) for block in blocks])  # fmt: skip
        ends = (newline.nonzero().flatten() + 1).tolist()
        if kind != IMAGE:
            pooled = math.ceil(self._side / 2)
            return [self._video(end - start - 1, pooled) for start, end in zip([0, *ends[:-1]], ends, strict=True)]
        layouts, start = [], 0
        while start < len(newline):
            grid = start + self._side**2
            width = int(newline[grid:].int().argmax())
            rows = 0
            while grid + (rows + 1) * (width + 1) <= len(newline) and newline[grid + rows * (width + 1) + width]:
                rows += 1
            layouts.append(self._image(rows, width))
            start = grid + rows * (width + 1)
        return layouts

    def media_pieces(self, kind: int, output: BaseModelOutputWithPooling, tokens: int) -> list[torch.Tensor]:
        """Each OneVision video closed by its `image_newline`, where `get_video_features` left it out (5.17's forward
        appends it after; later releases' `get_video_features` do)."""
        pieces = super().media_pieces(kind, output, tokens)
        if kind != IMAGE and sum(map(len, pieces)) + len(pieces) == tokens:
            newline = self.model.model.image_newline[None]
            pieces = [part for piece in pieces for part in (piece, newline)]
        return pieces

    def frame_runs(self, inputs: dict, frames: int) -> list[torch.Tensor | EncodedFrames]:
        pixels = inputs["pixel_values_videos"]  # (videos, frames, channels, height, width)
        per_frame = math.ceil(self._side / 2) ** 2
        pieces = []
        for video in range(len(pixels)):
            for first in range(0, pixels.shape[1], frames):
                run = pixels[video : video + 1, first : first + frames]
                tokens = run.shape[1] * per_frame
                encode = partial(self._frames_features, {"pixel_values_videos": run}, tokens)
                pieces.append(EncodedFrames(tokens, encode))
            pieces.append(self.model.model.image_newline[None])
        return pieces

    def _image(self, rows: int, width: int) -> torch.Tensor:
        high = raster(1, rows, width + 1)
        high[:, 0] = 1
        high[high[:, 2] == width, 2] = -1
        return torch.cat([raster(1, self._side, self._side), high])

    @staticmethod
    def _video(tokens: int, pooled: int) -> torch.Tensor:
        frames = tokens // pooled**2
        return torch.cat([raster(frames, pooled, pooled), torch.tensor([[frames - 1, pooled - 1, -1]])])

    def arrange_vision_signal(self, kind: int, raw: torch.Tensor, arguments: dict) -> torch.Tensor:
        """The model's own packing (tiles, unpadding, `image_newline` rows) and video pooling, applied to the
        signal as a one-channel feature; newline tokens get 0."""
        base = self.model.base_model
        signal = select_tower_tokens(base.vision_tower, raw, self.config.vision_feature_select_strategy)[..., None]
        newline = signal.new_zeros(1)
        if kind != IMAGE:
            videos = next(iter(arguments.values())).shape[0]  # the pixels, whose parameter's name varies by version
            pooled = base.apply_pooling(signal).reshape(videos, -1)
            return torch.cat([pooled, pooled.new_zeros(videos, 1)], dim=1).flatten()
        sizes = arguments["image_sizes"]
        tiles = list(signal.split(self._tiles(sizes, arguments.get("batch_num_images"))))
        if self.config.model_type == "llava_onevision":
            aspect = arguments.get("vision_aspect_ratio") or self.config.vision_aspect_ratio
            packed, _ = base.pack_image_features(tiles, sizes, image_newline=newline, vision_aspect_ratio=aspect)
        else:
            strategy = self.config.vision_feature_select_strategy
            packed, _ = base.pack_image_features(tiles, sizes, strategy, image_newline=newline)
        return torch.cat(packed).flatten()

    def _tiles(self, sizes: torch.Tensor, images_per_row: torch.Tensor | None) -> list[int]:
        """Tiles the tower encoded for each image: as `get_image_features` counts them (a OneVision row with
        several images encodes each as one tile)."""
        single = [True] * len(sizes) if images_per_row is None else [n == 1 for n in images_per_row for _ in range(n)]
        pinpoints, side = self.config.image_grid_pinpoints, self.config.vision_config.image_size
        return [
            image_size_to_num_patches(size, pinpoints, side) if alone else 1
            for size, alone in zip(sizes, single, strict=True)
        ]
