"""Attention that the last prompt token pays to each token, recomputed for one query row under any backend."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mmtoken.kernels.query_scores import query_scores
from mmtoken.scorers.base import ScoreInput


def rotate(states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of (batch, heads, n, head_dim) `states`, as the language model applies it."""
    from transformers.models.llama.modeling_llama import rotate_half  # imported on use: `mmtoken methods` stays light

    return states * cos.unsqueeze(1) + rotate_half(states) * sin.unsqueeze(1)


def rotated_queries(layer: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The queries (batch, heads, n, head_dim) that decoder `layer` makes of its inputs `hidden` (batch, n, dim),
    with the rotary embedding (`cos`, `sin`) of their positions."""
    attention = layer.self_attn
    states = layer.input_layernorm(hidden)
    batch, length, _ = states.shape
    query = attention.q_proj(states).view(batch, length, -1, attention.head_dim).transpose(1, 2)
    return rotate(query, cos, sin)


@dataclass
class LastQueryAttention:
    """Head-averaged softmax attention from the last prompt token to every token, at the mimicked layer.

    Only the one query row is computed (layer norm, q/k projections, rotary embedding; the softmax over the keys in
    one Triton kernel on a GPU, `mmtoken.kernels.query_scores`), so it costs O(n) and never needs eager attention:
    FastV (arXiv 2403.06764) reads it at the layer before the cut, PyramidDrop (arXiv 2410.17247) at the layer after
    it. `rope=False` leaves out the rotary embedding, as FEATHER proposes.
    """

    layer_offset: int = 0
    rope: bool = True

    def score(self, inputs: ScoreInput) -> torch.Tensor:
        attention = inputs.layer.self_attn
        states = inputs.layer.input_layernorm(inputs.hidden)
        batch, length, _ = states.shape
        head_dim = attention.head_dim
        query = attention.q_proj(states[:, -1:]).view(batch, 1, -1, head_dim).transpose(1, 2)
        keys = attention.k_proj(states).view(batch, length, -1, head_dim)
        cos, sin = inputs.position_embeddings if self.rope else (None, None)
        if self.rope:
            query = rotate(query, cos[:, -1:], sin[:, -1:])
        return query_scores(query[:, :, 0], keys, cos, sin, inputs.valid, attention.scaling)
