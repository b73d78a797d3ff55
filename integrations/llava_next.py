"""LLaVA-NeXT and LLaVA-OneVision: a base grid plus an any-resolution grid whose rows end in `image_newline`."""

from __future__ import annotations

import math

import torch

from mmtoken.engine.state import IMAGE, VIDEO
from mmtoken.integrations.base import Adapter, raster


class LlavaNextAdapter(Adapter):
    """LLaVA-NeXT and LLaVA-OneVision. An image is the base image's square grid (frame 0), then the unpadded
    high-resolution grid (frame 1) with an `image_newline` token closing each row (column -1). A OneVision
    video is its frames pooled 2 x 2, closed by one `image_newline`. Newlines are found by their embedding."""

    model_types = ("llava_next", "llava_onevision")

    @property
    def _side(self) -> int:
        vision = self.config.vision_config
        return vision.image_size // vision.patch_size

    def expected_tokens(self, kind: int, inputs: dict) -> int | None:
        expected = super().expected_tokens(kind, inputs)
        if kind == VIDEO and expected is not None:
            # transformers before 5.2x appends each video's image_newline after get_video_features, not inside it
            newline = self.model.model.image_newline
            videos = inputs["mm_encoder_outputs"]["video"].pooler_output
            expected += sum(not torch.equal(video[-1], newline.to(video.dtype)) for video in videos)
        return expected

    def split_run(self, kind: int, embeddings: torch.Tensor, positions: torch.Tensor | None) -> list[torch.Tensor]:
        newline = (embeddings == self.model.model.image_newline.to(embeddings.dtype)).all(-1).cpu()
        ends = (newline.nonzero().flatten() + 1).tolist()
        if kind != IMAGE:
            pooled = math.ceil(self._side / 2)
            return [self._video(end - start - 1, pooled) for start, end in zip([0, *ends[:-1]], ends, strict=True)]
        layouts, start = [], 0
        while start < len(embeddings):
            grid = start + self._side**2
            width = int(newline[grid:].int().argmax())
            rows = 0
            while grid + (rows + 1) * (width + 1) <= len(newline) and newline[grid + rows * (width + 1) + width]:
                rows += 1
            layouts.append(self._image(rows, width))
            start = grid + rows * (width + 1)
        return layouts

    def _image(self, rows: int, width: int) -> torch.Tensor:
        high = raster(1, rows, width + 1)
        high[:, 0] = 1
        high[high[:, 2] == width, 2] = -1
        return torch.cat([raster(1, self._side, self._side), high])

    @staticmethod
    def _video(tokens: int, pooled: int) -> torch.Tensor:
        frames = tokens // pooled**2
        return torch.cat([raster(frames, pooled, pooled), torch.tensor([[frames - 1, pooled - 1, -1]])])
