"""Qwen's ViT attention over all of its segments in one call.

Qwen2-VL's and Qwen2.5-VL's vision towers attend within segments of their packed tokens: each frame, and in most of
Qwen2.5-VL's layers each window of 8 x 8 patches. Under sdpa, transformers splits the tokens on the host and calls
attention once per segment: for one 1344-px image, 144 windows in each of 28 layers, about 4,000 calls, and a host
read in every layer. A "flash" attention implementation gets the whole packed batch and its bounds instead, so one
registered under such a name (`SEGMENT_ATTENTION`) runs every segment in one sdpa call: equal segments as a view of
the packed tokens, unequal ones gathered and padded to the longest, the padding masked out. The longest comes from
the tower (precomputed from the grid by `mmtoken.graphs.vision`, or read once per forward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface

SEGMENT_ATTENTION = "flash_api_segments_sdpa"  # "flash" in the name: the tower hands over the packed batch


def attend_segments(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bounds: torch.Tensor, longest: int, scale: float
) -> torch.Tensor:
    """(heads, n, dim) each -> (n, heads, dim): attention within each segment [bounds[i], bounds[i + 1]) of the n
    packed tokens, none longer than `longest`."""
    heads, packed, dim = query.shape
    count = len(bounds) - 1
    if count * longest == packed:  # every segment is the longest: a view
        parts = [tensor.reshape(heads, count, longest, dim).transpose(0, 1) for tensor in (query, key, value)]
        out = F.scaled_dot_product_attention(*parts, scale=scale)
        return out.transpose(1, 2).reshape(packed, heads, dim)
    index = bounds[:-1, None] + torch.arange(longest, device=query.device)
    valid = index < bounds[1:, None]
    index = index.clamp(max=packed - 1)
    parts = [tensor[:, index].transpose(0, 1) for tensor in (query, key, value)]  # (segments, heads, longest, dim)
    out = F.scaled_dot_product_attention(*parts, attn_mask=valid[:, None, None, :], scale=scale)
    # padded places write to a spare last row, so no count of the valid ones is read back
    places = torch.where(valid, index, packed).flatten()
    packed_out = out.new_empty(packed + 1, heads, dim)
    packed_out[places] = out.transpose(1, 2).reshape(-1, heads, dim)
    return packed_out[:packed]


def segment_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: None,
    scaling: float,
    cu_seq_lens_q: torch.Tensor,
    max_length_q: int,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """The attention function of `SEGMENT_ATTENTION`: (1, heads, n, dim) in, (1, n, heads, dim) out."""
    out = attend_segments(query[0], key[0], value[0], cu_seq_lens_q, max_length_q, scaling)
    return out[None], None


AttentionInterface.register(SEGMENT_ATTENTION, segment_attention)


class SegmentAttention:
    """Runs the attention of a Qwen ViT (`tower`) through `segment_attention` while attached: every frame or window
    of a block in one call."""

    def __init__(self, tower: nn.Module) -> None:
        self.config = tower.config
        self._implementation = self.config._attn_implementation

    def attach(self) -> None:
        self.config._attn_implementation = SEGMENT_ATTENTION

    def detach(self) -> None:
        self.config._attn_implementation = self._implementation
