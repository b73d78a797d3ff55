"""The attention of a graphed decode step under sdpa: the fixed cache's one-query attention kernel
(`mmtoken.kernels.decode_attention`), registered with transformers' attention interface under `FIXED_CACHE` and
switched on only while a step over a fixed cache runs (so prefill and other requests keep sdpa)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers import AttentionInterface, PretrainedConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from mmtoken.kernels.decode_attention import decode_attention

FIXED_CACHE = "mmtoken_fixed_cache"


def fixed_cache_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """A decode step's attention over a fixed cache (its mask hides what is not written yet); anything else, sdpa."""
    if query.shape[2] != 1 or attention_mask is None or attention_mask.dtype != torch.bool:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    out = decode_attention(query, key, value, attention_mask[:, 0, 0, :], scale)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(FIXED_CACHE, fixed_cache_attention)
AttentionMaskInterface.register(FIXED_CACHE, sdpa_mask)


@contextmanager
def fixed_cache_attention_in(config: PretrainedConfig) -> Iterator[None]:
    """While the block runs, layers of `config` that use sdpa attend through `fixed_cache_attention`."""
    if config._attn_implementation != "sdpa":
        yield
        return
    config._attn_implementation_internal = FIXED_CACHE
    try:
        yield
    finally:
        config._attn_implementation_internal = "sdpa"
