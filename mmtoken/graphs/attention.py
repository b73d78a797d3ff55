"""Attention under sdpa while a graph runs, registered with transformers' attention interfaces and switched on only
for the length of a graphed call (other calls keep sdpa):
- `FIXED_CACHE`, a decode step over a fixed cache: the one-query attention kernel (`mmtoken.kernels.decode_attention`);
- `GRAPHED_PREFILL`, a prefill: sdpa over a mask that is built wherever there is a padding mask, since skipping it
  would be decided by reading the padding mask on the host, which a graph cannot do.
`mmtoken.engine.attending.attention_in` switches them on.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from mmtoken.kernels.decode_attention import decode_attention

FIXED_CACHE = "mmtoken_fixed_cache"
GRAPHED_PREFILL = "mmtoken_graphed_prefill"


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


def built_sdpa_mask(
    *args: object, allow_is_causal_skip: bool = True, attention_mask: torch.Tensor | None = None, **kwargs: object
) -> torch.Tensor | None:
    """sdpa's mask, skipped for `is_causal` only where there is no padding mask (the skip needs no host read)."""
    skip = allow_is_causal_skip and attention_mask is None
    return sdpa_mask(*args, attention_mask=attention_mask, allow_is_causal_skip=skip, **kwargs)


AttentionInterface.register(FIXED_CACHE, fixed_cache_attention)
AttentionMaskInterface.register(FIXED_CACHE, sdpa_mask)
AttentionInterface.register(GRAPHED_PREFILL, sdpa_attention_forward)
AttentionMaskInterface.register(GRAPHED_PREFILL, built_sdpa_mask)
