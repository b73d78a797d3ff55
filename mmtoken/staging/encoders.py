"""The encode stage: a request's media through the vision tower and projector, through the embedding cache. The
`LocalEncoder` runs when the scheduler asks, between its batches (colocated); the `ThreadEncoder` in a thread of the
same process as requests arrive, on a CUDA stream of its own; `mmtoken.staging.staged` has the one that runs in a
process of its own."""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Protocol

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

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


class ThreadEncoder:
    """Encodes in a thread of its own, in arrival order, as requests arrive, on a CUDA stream of its own (where the
    model is on a GPU), so encoding overlaps the batch that is decoding without a second process."""

    def __init__(self, model: nn.Module, cache: EmbeddingCache | None, settings: dict, signal: bool) -> None:
        self.model, self.cache, self.settings, self.signal = model, cache, settings, signal
        device = next(model.parameters()).device
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._pending: dict[int, Future] = {}
        self._queue: queue.Queue[tuple[Job, Future] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="mmtoken-encoder", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        future = self._pending[job.id] = Future()
        self._queue.put((job, future))

    def features(self, job: Job) -> Encoded:
        encoded, done = self._pending.pop(job.id).result()
        if done is not None:  # written on the encoder's stream, read on this one
            current = torch.cuda.current_stream()
            current.wait_event(done)
            for leaf in tree_leaves((encoded.features, encoded.signals)):
                if torch.is_tensor(leaf):
                    leaf.record_stream(current)
        return encoded

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    @torch.no_grad()
    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            job, future = item
            try:
                if self._stream is None:
                    future.set_result((encode_cached(self.model, job, self.cache, self.settings, self.signal), None))
                    continue
                with torch.cuda.stream(self._stream):
                    encoded = encode_cached(self.model, job, self.cache, self.settings, self.signal)
                    done = torch.cuda.Event()
                    done.record()
                future.set_result((encoded, done))
            except Exception as error:  # the request gets this as its answer
                future.set_exception(error)
