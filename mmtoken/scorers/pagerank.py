"""AIM's importance: PageRank over the attention that the text pays, recomputed for the text rows only."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmtoken.ops import gather_tokens
from mmtoken.scorers.attention import rotate
from mmtoken.scorers.base import ScoreInput


@dataclass
class TextRank:
    """Importance of every token as AIM (arXiv 2412.03248) ranks them: a few PageRank steps over the sharpened
    attention (softmax of the logits divided by `temperature`) of the mimicked layer, then the root mean square over
    heads. Only the text tokens' query rows are recomputed (layer norm, q/k projections, rotary embedding), so the
    cost is text x tokens, not tokens squared; what visual tokens would pass on is left out.
    Defaults: 5 steps at temperature 0.1 on the layer before the cut, as the paper.
    """

    layer_offset: int = -1
    temperature: float = 0.1
    steps: int = 5

    def score(self, inputs: ScoreInput) -> torch.Tensor:
        attention = inputs.layer.self_attn
        states = inputs.layer.input_layernorm(inputs.hidden)
        batch, length, _ = states.shape
        text = inputs.valid & ~inputs.candidates
        width = length - min(inputs.visual_counts)  # every row's text fits; the other rows are masked below
        rows = text.int().argsort(dim=1, descending=True, stable=True)[:, :width]
        cos, sin = (table.expand(batch, -1, -1) for table in inputs.position_embeddings)
        query = attention.q_proj(gather_tokens(states, rows)).view(batch, rows.shape[1], -1, attention.head_dim)
        query = rotate(query.transpose(1, 2), gather_tokens(cos, rows), gather_tokens(sin, rows))
        keys = attention.k_proj(states).view(batch, length, -1, attention.head_dim)
        keys = rotate(keys.transpose(1, 2), cos, sin).repeat_interleave(query.shape[1] // keys.shape[2], dim=1)
        logits = (query @ keys.transpose(2, 3)).float() * (attention.scaling / self.temperature)
        before = torch.arange(length, device=rows.device)[None, None, :] <= rows[..., None]
        weights = logits.masked_fill(~(before & inputs.valid[:, None, :])[:, None], float("-inf")).softmax(-1)
        weights = weights.masked_fill(~text.gather(1, rows)[:, None, :, None], 0.0)
        heads = weights.shape[1]
        rank = (inputs.valid.float() / inputs.valid.sum(1, keepdim=True))[:, None, :].expand(-1, heads, -1)
        for _ in range(self.steps):
            rank = (rank.gather(2, rows[:, None, :].expand(-1, heads, -1))[:, :, None, :] @ weights)[:, :, 0]
        return rank.pow(2).mean(1).sqrt()
