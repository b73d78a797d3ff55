"""FLOPs of a language-model prefill, by two formulas.

- `paper_flops`: the formula of FastV, PyramidDrop and DivPrune, 4nd^2 + 2n^2d + 2ndm per layer (it counts
  multiply-accumulates, a 2-matrix MLP, no GQA, a full n x n attention); use it to compare with their tables.
- `exact_flops`: 2 FLOPs per multiply-accumulate, the gated 3-matrix MLP, grouped K/V projections and causal
  attention (query i sees i + 1 keys).
Both take the number of tokens alive at each decoder layer of one batch row.
"""

from __future__ import annotations

from transformers import PretrainedConfig


def paper_flops(tokens_per_layer: list[int], config: PretrainedConfig) -> float:
    d, m = config.hidden_size, config.intermediate_size
    return sum(4 * n * d * d + 2 * n * n * d + 2 * n * d * m for n in tokens_per_layer)


def exact_flops(tokens_per_layer: list[int], config: PretrainedConfig) -> float:
    d, m = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    q_width, kv_width = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    total = 0.0
    for n in tokens_per_layer:
        projections = 2 * n * d * (2 * q_width + 2 * kv_width)
        attention = 2 * 2 * q_width * n * (n + 1) / 2
        mlp = 2 * 3 * n * d * m
        total += projections + attention + mlp
    return total
