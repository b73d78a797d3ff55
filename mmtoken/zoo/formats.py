"""How each probe model's format takes a rendered probe batch: pixels as its processor would prepare them, the
number of visual tokens per image or video, and where its vision tower's per-patch features are read.

Training renders batches on the GPU, so it cannot go through the (CPU, PIL) processors; these functions do the
same arithmetic on tensors, and `tests/test_zoo.py` checks them against the real processors.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel, ProcessorMixin

from mmtoken.zoo.probe import IMAGE_SIZE, PATCH, VIDEO_SIZE, Batch


def _normalised(pixels: Tensor, processor: ProcessorMixin) -> Tensor:
    """uint8 pixels (..., 3, H, W) rescaled and normalised with the image processor's mean and std."""
    image_processor = processor.image_processor
    mean = torch.tensor(image_processor.image_mean, device=pixels.device)[:, None, None]
    std = torch.tensor(image_processor.image_std, device=pixels.device)[:, None, None]
    return (pixels.float() / 255 - mean) / std


class LlavaFormat:
    """LLaVA-1.5: one normalised 336-px image per sample, CLS + 576 patches in the tower, 576 visual tokens."""

    kinds = ("image",)
    takes_position_ids = True  # 1-D positions, counted from the first unpadded token

    def __init__(self, model: PreTrainedModel, processor: ProcessorMixin) -> None:
        self.model, self.processor = model, processor

    def visual_tokens(self, kind: str, frames: int = 8) -> int:
        return self.model.config.image_seq_length

    def vision_inputs(self, batch: Batch, kind: str) -> dict[str, Tensor]:
        return {"pixel_values": _normalised(batch.pixels, self.processor)}

    def image_features(self, batch: Batch) -> Tensor:
        """(n, 576, width) the projected patch features the language model reads for each image."""
        config = self.model.config
        features = self.model.model.get_image_features(
            **self.vision_inputs(batch, "image"),
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
        ).pooler_output
        return torch.stack(list(features))

    def encoder_parameters(self) -> list[nn.Parameter]:
        """The vision tower's parameters, without the projector's."""
        return list(self.model.model.vision_tower.parameters())

    def patch_layer(self) -> nn.Module:
        return self.model.model.vision_tower.encoder.layers[self.model.config.vision_feature_layer]

    def patch_features(self, output: Tensor) -> Tensor:
        """(samples * 576, width) patch features, CLS dropped, in row-major patch order."""
        return output[:, 1:].flatten(0, 1)

    def patch_targets(self, labels: Tensor) -> Tensor:
        return labels.flatten()


class QwenFormat:
    """Qwen2-VL: frames in temporal pairs of 14-px patches, flattened in the order of the 2 x 2 merge (an image is
    its own pair); a 336-px image gives 576 patches and 144 visual tokens, 8 frames of 224 px 1024 and 256."""

    kinds = ("image", "video")
    takes_position_ids = False  # M-RoPE: the model derives positions from the mask and the visual grids

    def __init__(self, model: PreTrainedModel, processor: ProcessorMixin) -> None:
        self.model, self.processor = model, processor
        vision = model.config.vision_config
        self.temporal, self.merge = vision.temporal_patch_size, vision.spatial_merge_size

    def grid(self, kind: str, frames: int) -> tuple[int, int, int]:
        if kind == "image":
            return 1, IMAGE_SIZE // PATCH, IMAGE_SIZE // PATCH
        return -(-frames // self.temporal), VIDEO_SIZE // PATCH, VIDEO_SIZE // PATCH

    def visual_tokens(self, kind: str, frames: int = 8) -> int:
        t, h, w = self.grid(kind, frames)
        return t * h * w // self.merge**2

    def patches(self, pixels: Tensor) -> Tensor:
        """(n, frames, 3, H, W) normalised pixels -> (n * t * h * w, 3 * temporal * 14 * 14) flat patches."""
        n, frames, channels, height, width = pixels.shape
        if frames % self.temporal:
            pixels = torch.cat(
                [pixels, pixels[:, -1:].expand(n, self.temporal - frames % self.temporal, -1, -1, -1)], 1
            )
        t, h, w, m = pixels.shape[1] // self.temporal, height // PATCH, width // PATCH, self.merge
        grid = pixels.reshape(n, t, self.temporal, channels, h // m, m, PATCH, w // m, m, PATCH)
        grid = grid.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
        return grid.reshape(n * t * h * w, channels * self.temporal * PATCH * PATCH)

    def vision_inputs(self, batch: Batch, kind: str) -> dict[str, Tensor]:
        pixels = _normalised(batch.pixels, self.processor)
        if kind == "image":
            pixels = pixels[:, None]
        grid = torch.tensor([self.grid(kind, pixels.shape[1])] * len(pixels), device=pixels.device)
        if kind == "image":
            return {"pixel_values": self.patches(pixels), "image_grid_thw": grid}
        return {"pixel_values_videos": self.patches(pixels), "video_grid_thw": grid}

    def image_features(self, batch: Batch) -> Tensor:
        """(n, 144, width) the merged patch features the language model reads for each image."""
        features = self.model.model.get_image_features(**self.vision_inputs(batch, "image")).pooler_output
        return torch.stack(list(features))

    def encoder_parameters(self) -> list[nn.Parameter]:
        """The vision encoder's parameters, without the merger's (Qwen's projector)."""
        return [parameter for name, parameter in self.model.model.visual.named_parameters()
                if not name.startswith("merger.")]  # fmt: skip

    def patch_layer(self) -> nn.Module:
        return self.model.model.visual.blocks[-2]

    def patch_features(self, output: Tensor) -> Tensor:
        return output

    def patch_targets(self, labels: Tensor) -> Tensor:
        """(n, 24, 24) per-patch labels in the merge order of :meth:`patches`."""
        n, h, w, m = *labels.shape, self.merge
        return labels.reshape(n, h // m, m, w // m, m).permute(0, 1, 3, 2, 4).flatten()


def probe_format(model: PreTrainedModel, processor: ProcessorMixin) -> LlavaFormat | QwenFormat:
    """The format of a probe model, by its `model_type`."""
    formats = {"llava": LlavaFormat, "qwen2_vl": QwenFormat}
    model_type = model.config.model_type
    if model_type not in formats:
        raise ValueError(f"no probe format for model type {model_type!r}; known: {', '.join(formats)}")
    return formats[model_type](model, processor)
