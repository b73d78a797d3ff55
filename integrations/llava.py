"""LLaVA-1.5: a CLIP grid of (image_size / patch_size)^2 tokens per image."""

from __future__ import annotations

import torch

from mmtoken.integrations.base import Adapter, raster
from mmtoken.integrations.vision import TowerAttention, select_tower_tokens
from mmtoken.state import IMAGE


class LlavaAdapter(TowerAttention, Adapter):
    """LLaVA-1.5 (`LlavaForConditionalGeneration`): each image is one square patch grid, led by the CLS token
    when `vision_feature_select_strategy` is "full" (it gets no grid cell)."""

    model_types = ("llava",)

    @property
    def _layout(self) -> torch.Tensor:
        vision = self.config.vision_config
        side = vision.image_size // vision.patch_size
        layout = raster(1, side, side)
        if self.config.vision_feature_select_strategy == "full":
            layout = torch.cat([torch.tensor([[0, 0, -1]]), layout])
        return layout

    def expected_tokens(self, kind: int, inputs: dict) -> int | None:
        pixel_values = inputs.get("pixel_values")
        if kind != IMAGE or pixel_values is None:
            return super().expected_tokens(kind, inputs)
        return pixel_values.shape[0] * len(self._layout)

    def split_run(self, kind: int, blocks: list[torch.Tensor], positions: torch.Tensor | None) -> list[torch.Tensor]:
        layout = self._layout
        return [layout] * (sum(map(len, blocks)) // len(layout))

    def arrange_vision_signal(self, kind: int, raw: torch.Tensor, arguments: dict) -> torch.Tensor:
        tower = self.model.base_model.vision_tower
        return select_tower_tokens(tower, raw, self.config.vision_feature_select_strategy).flatten()
