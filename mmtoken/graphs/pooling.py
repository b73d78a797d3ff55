"""LLaVA-OneVision's pooling of video frames as two small matrix products.

transformers pools each frame's grid of tower features (27 x 27 for SigLIP at 384 px) to half its side with a
bilinear `interpolate` over channels-first features; on an H200 that one kernel takes 45 ms of a 107 ms encode of
32 frames. Bilinear resizing is linear and separable: along each axis a fixed (out, in) matrix. So the same pooling
is a product with that matrix over the rows and another over the columns, on the channels-last features the tower
hands over, computed in float32 as the interpolation kernel computes.
"""

from __future__ import annotations

import math
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn


@cache
def interpolation_matrix(size_in: int, size_out: int, device: torch.device) -> torch.Tensor:
    """(size_out, size_in): the weights with which `F.interpolate(mode="linear")` mixes inputs into each output."""
    identity = torch.eye(size_in, device=device)[:, None, :]  # size_in one-hot signals of one channel
    return F.interpolate(identity, size=size_out, mode="linear")[:, 0].T.contiguous()


class MatrixPooling:
    """Replaces `apply_pooling` of a LLaVA-OneVision model (the module that owns it) by `pool` while attached."""

    def __init__(self, owner: nn.Module) -> None:
        self.owner = owner
        vision = owner.config.vision_config
        self.side = vision.image_size // vision.patch_size

    def attach(self) -> None:
        self.owner.apply_pooling = self.pool

    def detach(self) -> None:
        del self.owner.apply_pooling  # the class's method shows through again

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """(frames, side * side, dim) -> (frames, ceil(side / 2) ** 2, dim), as `apply_pooling` computes it."""
        frames, _, dim = features.shape
        pooled = math.ceil(self.side / 2)
        matrix = interpolation_matrix(self.side, pooled, features.device)
        grid = features.float().view(frames, self.side, self.side * dim)
        rows = (matrix @ grid).view(frames * pooled, self.side, dim)  # rows pooled: (frames * pooled, side, dim)
        return (matrix @ rows).view(frames, pooled * pooled, dim).to(features.dtype)
