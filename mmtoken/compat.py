"""What differs between the transformers releases mmtoken supports (5.17 through 5.24), in one place.

- The KV cache argument of models and decoder layers, and the field of their outputs: `past_key_values` up to
  5.23, `cache` from 5.24 on (which still accepts the old name at the top-level call, with a warning). A pre-hook
  sees the keyword as the caller wrote it, so hooks read either name.

- `generate`'s position ids of a prompt come from the private `_prepare_position_ids_for_generation` on every
  release of the range (`generation_positions`), which a decode loop of its own needs to match `generate`.

- LLaVA-OneVision closes each video with its `image_newline` in its forward on 5.17 and in `get_video_features`
  later; the adapter's `media_pieces` counts which (`integrations/llava_next.py`).

Everything else mmtoken touches is the same across the range (checked by CI, which runs the invariants on the
oldest and the whole suite on the newest release).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import Cache
from transformers.models.llama.modeling_llama import LlamaModel

CACHE_NAMES = ("cache", "past_key_values")
CACHE_ARGUMENT = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


def cache_in(kwargs: dict) -> Cache | None:
    """The KV cache a call was given, under either name (None at a call without one)."""
    for name in CACHE_NAMES:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def cache_of(output: object) -> Cache | None:
    """The KV cache a model output carries, under either field name (None when it carries none)."""
    for name in CACHE_NAMES:
        if isinstance(output, dict) and output.get(name) is not None:
            return output[name]
    return None


def with_cache(cache: Cache | None) -> dict[str, Cache | None]:
    """Keyword arguments that hand `cache` to a model forward or to `generate`, under this release's name."""
    return {CACHE_ARGUMENT: cache}


def replace_cache(output: dict, cache: Cache) -> None:
    """Make a model output carry `cache` instead of the KV cache it carries."""
    for name in CACHE_NAMES:
        if output.get(name) is not None:
            output[name] = cache


def generation_positions(model: nn.Module, inputs: dict) -> torch.Tensor:
    """The position ids `generate` gives a prompt's tokens (each row's own, from its attention mask; M-RoPE
    positions for Qwen2-VL families), so a prefill run outside `generate` is the same one."""
    return model._prepare_position_ids_for_generation(inputs["input_ids"], dict(inputs))
