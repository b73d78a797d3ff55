"""The encode stage: a request's media through the vision tower and projector, through the embedding cache. The
`LocalEncoder` runs in the language model's process when the scheduler asks (colocated); `mmtoken.staging.staged`
has the one that runs in a process of its own."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from mmtoken.encoding import Encoded, encode
from mmtoken.staging.embedding_cache import EmbeddingCache, media_key
from mmtoken.staging.jobs import Job


def on_model(model: nn.Module, inputs: dict) -> dict:
    """`inputs` on `model`'s device, floating tensors in its dtype."""
    parameter = next(model.parameters())
    return {name: value.to(parameter.device, parameter.dtype if value.is_floating_point() else value.dtype)
            if torch.is_tensor(value) else value for name, value in inputs.items()}  # fmt: skip


def encode_cached(model: nn.Module, job: Job, cache: EmbeddingCache | None, settings: dict, signal: bool) -> Encoded:
    """`job`'s media encoded by `model` (with the vision `signal` where the method reads it), or taken from
    `cache` where the same media came before under the same `settings`."""
    if cache is None:
        return encode(model, on_model(model, job.inputs), signal=signal)
    key = job.media_key or media_key(job.inputs, {**settings, "signal": signal})
    encoded = cache.get(key)
    job.cache_hit = encoded is not None
    if encoded is None:
        encoded = encode(model, on_model(model, job.inputs), signal=signal)
        cache.put(key, encoded)
    return encoded


class Encoder(Protocol):
    """Where a scheduler gets a request's encoding: `submit` when the request arrives, `features` when its batch
    starts."""

    def submit(self, job: Job) -> None: ...

    def features(self, job: Job) -> Encoded: ...


class LocalEncoder:
    """Encodes in the caller's thread when the batch starts: colocated, the encoder takes its turn on the device
    between the language model's batches."""

    def __init__(self, model: nn.Module, cache: EmbeddingCache | None, settings: dict, signal: bool) -> None:
        self.model, self.cache, self.settings, self.signal = model, cache, settings, signal

    def submit(self, job: Job) -> None:
        pass

    @torch.no_grad()
    def features(self, job: Job) -> Encoded:
        return encode_cached(self.model, job, self.cache, self.settings, self.signal)
