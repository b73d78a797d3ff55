"""Qwen's ViT attention over all of its segments in one call.

Qwen2-VL's and Qwen2.5-VL's vision towers attend within segments of their packed tokens: each frame, and in most of
Qwen2.5-VL's layers each window of 8 x 8 patches. Under sdpa, transformers splits the tokens on the host and calls
attention once per segment: for one 1344-px image, 144 windows in each of 28 layers, about 4,000 calls, and a host
read in every layer. Here the segments are one batch of one call: equal segments a view of the packed tokens,
unequal ones gathered and padded to the longest, the padding masked out. The longest segment comes as the tower's
`max_seqlen` (precomputed by `mmtoken.graphs.vision` from the grid), so nothing is read back from the device.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn


def attend_segments(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens: torch.Tensor, longest: int, scale: float
) -> torch.Tensor:
    """(heads, n, dim) each -> (n, heads, dim): attention within each segment [cu_seqlens[i], cu_seqlens[i + 1])
    of the n packed tokens, none longer than `longest`."""
    heads, packed, dim = query.shape
    count = len(cu_seqlens) - 1
    if count * longest == packed:  # every segment is the longest: a view
        parts = [tensor.reshape(heads, count, longest, dim).transpose(0, 1) for tensor in (query, key, value)]
        out = F.scaled_dot_product_attention(*parts, scale=scale)
        return out.transpose(1, 2).reshape(packed, heads, dim)
    index = cu_seqlens[:-1, None] + torch.arange(longest, device=query.device)
    valid = index < cu_seqlens[1:, None]
    index = index.clamp(max=packed - 1)
    parts = [tensor[:, index].transpose(0, 1) for tensor in (query, key, value)]  # (segments, heads, longest, dim)
    out = F.scaled_dot_product_attention(*parts, attn_mask=valid[:, None, None, :], scale=scale)
    # padded places write to a spare last row, so no count of the valid ones is read back
    places = torch.where(valid, index, packed).flatten()
    packed_out = out.new_empty(packed + 1, heads, dim)
    packed_out[places] = out.transpose(1, 2).reshape(-1, heads, dim)
    return packed_out[:packed]


class SegmentAttention:
    """Replaces the forward of the attention in each block of a Qwen ViT (`tower`) by one that runs all of its
    segments in one attention call (`attend_segments`), with the module's own weights and rotary embedding, while
    attached."""

    def __init__(self, tower: nn.Module) -> None:
        self.modules = [block.attn for block in tower.blocks]

    def attach(self) -> None:
        for module in self.modules:
            module.forward = _forward.__get__(module)

    def detach(self) -> None:
        for module in self.modules:
            del module.forward  # the class's forward shows through again


def _forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    cu_seqlens: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    max_seqlen: int | None = None,
    **kwargs: object,
) -> torch.Tensor:
    """The attention of transformers' Qwen vision blocks (`VisionAttention.forward`), every segment at once."""
    rotate = sys.modules[type(self).__module__].apply_rotary_pos_emb_vision
    packed = hidden_states.shape[0]
    query, key, value = self.qkv(hidden_states).reshape(packed, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    query, key = rotate(query, key, *position_embeddings)
    if max_seqlen is None:
        max_seqlen = int(cu_seqlens.diff().max())
    parts = [tensor.transpose(0, 1) for tensor in (query, key, value)]  # (heads, n, dim)
    out = attend_segments(*parts, cu_seqlens, max_seqlen, self.scaling)
    return self.proj(out.reshape(packed, -1))
