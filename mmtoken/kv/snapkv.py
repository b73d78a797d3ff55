"""SnapKV: the entries the question's last tokens attend to."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mmtoken.kv.base import PressInput


def window_attention(inputs: PressInput) -> torch.Tensor:
    """(batch, n): the attention each entry gets from the prompt's last queries (each sees the entries up to its
    own), averaged over heads and queries."""
    batch, kv_heads, length, size = inputs.keys.shape
    queries = inputs.queries
    heads, window = queries.shape[1], queries.shape[2]
    grouped = queries.reshape(batch, kv_heads, heads // kv_heads * window, size)
    logits = (grouped @ inputs.keys.transpose(2, 3)).float() * inputs.scaling
    query_at = (length - window + torch.arange(window, device=logits.device)).repeat(heads // kv_heads)
    seen = torch.arange(length, device=logits.device)[None, :] <= query_at[:, None]
    allowed = seen[None, None] & inputs.valid[:, None, None, :]
    return logits.masked_fill(~allowed, float("-inf")).softmax(-1).mean(dim=(1, 2))


@dataclass
class SnapKV:
    """SnapKV (Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", arXiv 2404.14469): each
    entry's attention from the prompt's last `window` queries (each query sees the entries up to its own), averaged
    over heads and queries, then max-pooled along the sequence over `kernel` entries so that the neighbours of an
    entry that draws attention stay with it. The window's own entries always stay."""

    window: int = 8
    kernel: int = 5

    def score(self, inputs: PressInput) -> torch.Tensor:
        length, window = inputs.keys.shape[2], inputs.queries.shape[2]
        attention = window_attention(inputs)
        pooled = F.max_pool1d(attention[:, None], self.kernel, stride=1, padding=self.kernel // 2)[:, 0]
        return pooled.index_fill(1, torch.arange(length - window, length, device=pooled.device), float("inf"))
