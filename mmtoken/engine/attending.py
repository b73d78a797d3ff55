"""Switching the attention of a model's layers for the length of one call: transformers reads the implementation's
name from the config at every forward, so layers that use sdpa attend through another registered implementation
while the block runs, and through sdpa again after it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from transformers import PretrainedConfig


@contextmanager
def attention_in(config: PretrainedConfig, implementation: str) -> Iterator[None]:
    """While the block runs, layers of `config` that use sdpa attend through `implementation` (a name registered
    with transformers' `AttentionInterface` and `AttentionMaskInterface`)."""
    if config._attn_implementation != "sdpa":
        yield
        return
    config._attn_implementation_internal = implementation
    try:
        yield
    finally:
        config._attn_implementation_internal = "sdpa"
