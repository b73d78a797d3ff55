"""Model-family adapters, picked by `config.model_type`."""

from __future__ import annotations

from torch import nn

from mmtoken.integrations.base import Adapter
from mmtoken.integrations.llava import LlavaAdapter
from mmtoken.integrations.llava_next import LlavaNextAdapter
from mmtoken.integrations.qwen2_vl import Qwen2VLAdapter

ADAPTERS: dict[str, type[Adapter]] = {
    model_type: adapter
    for adapter in (LlavaAdapter, LlavaNextAdapter, Qwen2VLAdapter)
    for model_type in adapter.model_types
}


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter of `model`'s family; raises for a family mmtoken does not support."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(f"model type {model_type!r} is not supported; supported: {', '.join(sorted(ADAPTERS))}")
    return ADAPTERS[model_type](model)
