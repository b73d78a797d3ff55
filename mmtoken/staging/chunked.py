"""Chunked prefill, as Sarathi-Serve schedules it: a long prompt's prefill runs a chunk of its tokens at a time,
and the running batch decodes one step between two chunks, so a 10,000-token prompt that arrives stalls the
running requests for one chunk at a time instead of for its whole prefill.

The model's own forward runs the prefill (it encodes or is fed the media, merges them into the prompt and counts
its positions); only its language model's forward is split. That call runs in a thread of its own (`InChunks`),
which hands the device back to the scheduler's thread before each chunk after the first and waits for its turn, so
the two threads never run at once and the device's queue holds chunks and decode steps in the scheduler's order.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

import torch
from torch import nn

from mmtoken.compat import CACHE_NAMES, cache_in, cache_of, with_cache
from mmtoken.methods.base import BEFORE_LLM, Method

Result = TypeVar("Result")


def check_chunkable(method: Method, depth: int) -> None:
    """Raise a ValueError unless `method` cuts before the language model only: a cut inside it or a press of the
    cache ranks tokens by attention over the whole prompt, which a chunk does not hold."""
    inside = [step.name for step in method.steps
              if step.stage != BEFORE_LLM or any(layer > 0 for layer in step.named_layers(depth))]  # fmt: skip
    if inside:
        raise ValueError(f"chunked prefill runs the prompt a chunk at a time; {', '.join(inside)} cuts or "
                         "presses inside the language model, which needs the whole prompt at once: use continuous "
                         "batching")  # fmt: skip


class ChunkedLanguageModel:
    """While attached, the calls of `language_model` made in an `InChunks` thread run their prompt `chunk_tokens`
    tokens at a time, each chunk over the cache of the chunks before, pausing before every chunk after the first
    (the rest of the prompt runs as one chunk once the thread is told not to split); every other call (the decode
    steps) runs as it is. The call returns the last chunk's output, whose cache holds the whole prompt."""

    def __init__(self, language_model: nn.Module, chunk_tokens: int) -> None:
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
        self.language_model, self.chunk_tokens = language_model, chunk_tokens
        self._inner: Callable[..., object] | None = None
        self._turns = threading.local()

    def attach(self) -> None:
        if self._inner is not None:
            raise RuntimeError("the chunked prefill is attached already")
        self._inner = self.language_model.forward
        self.language_model.forward = self._forward

    def detach(self) -> None:
        if self._inner is not None:
            del self.language_model.forward
            self._inner = None

    def _forward(self, *args: object, **kwargs: object) -> object:
        prefill = getattr(self._turns, "prefill", None)
        if prefill is None:
            return self._inner(*args, **kwargs)
        if args or not _is_first_call(kwargs):
            raise ValueError("chunked prefill takes a prompt's first call: embeddings with a (batch, length) "
                             "mask and an empty cache or none, as the model's own forward hands them over")  # fmt: skip
        embeds, mask, cache = kwargs["inputs_embeds"], kwargs.get("attention_mask"), cache_in(kwargs)
        length, output, start = embeds.shape[1], None, 0
        while start < length:
            end = min(start + self.chunk_tokens, length) if prefill.split else length
            chunk = {name: value for name, value in kwargs.items() if name not in (*_BY_TOKEN, *CACHE_NAMES)}
            chunk["inputs_embeds"] = embeds[:, start:end]
            if torch.is_tensor(kwargs.get("position_ids")):
                chunk["position_ids"] = kwargs["position_ids"][..., start:end]
            if mask is not None:
                chunk["attention_mask"] = mask[:, :end]
            output = self._inner(**chunk, **with_cache(cache))
            cache, start = cache_of(output), end
            if start < length:
                prefill.pause()
        return output

    def in_chunks(self, run: Callable[[], Result], split: bool = True) -> InChunks[Result]:
        """`run` (a call that prefills through the model) started in a thread whose language model calls run in
        chunks (with `split`; else whole); it runs up to its first pause."""
        return InChunks(self._turns, run, split)


_BY_TOKEN = ("inputs_embeds", "attention_mask", "position_ids")


class InChunks(Generic[Result]):
    """`run` in a thread of its own that pauses between the chunks of its prefill: `advance` lets it run to its
    next pause (its next chunk, or with `split` False the rest of the prompt at once) or its end, and says whether
    it has ended; `result` is then what `run` returned, or raises what it raised. The caller's thread waits while it
    runs, so the two never run at once."""

    def __init__(self, turns: threading.local, run: Callable[[], Result], split: bool) -> None:
        self._go, self._paused = threading.Semaphore(0), threading.Semaphore(0)
        self.split = split
        self._ended = False
        self._result: Result | None = None
        self._error: BaseException | None = None

        def body() -> None:
            turns.prefill = self
            try:
                self._result = run()
            except BaseException as error:  # the scheduler's thread raises it from `result`
                self._error = error
            finally:
                turns.prefill = None
                self._ended = True
                self._paused.release()

        threading.Thread(target=body, name="mmtoken-chunked-prefill", daemon=True).start()
        self._paused.acquire()

    def pause(self) -> None:
        """In `run`'s thread: give the turn back, and wait for the next."""
        self._paused.release()
        self._go.acquire()

    def advance(self, split: bool = True) -> bool:
        """Run the next chunk, or with `split` False the rest of the prompt (nothing once ended); True once `run`
        has ended."""
        if not self._ended:
            self.split = split
            self._go.release()
            self._paused.acquire()
        return self._ended

    def result(self) -> Result:
        if not self._ended:
            raise RuntimeError("the chunked prefill has not ended: advance it first")
        if self._error is not None:
            raise self._error
        return self._result


def _is_first_call(kwargs: dict) -> bool:
    """Whether a language model call is a prompt's first: its embeddings, a (batch, length) mask or none, and no
    cache yet or an empty one to fill."""
    mask, cache = kwargs.get("attention_mask"), cache_in(kwargs)
    return (
        kwargs.get("inputs_embeds") is not None
        and kwargs.get("use_cache") is not False
        and (cache is None or cache.get_seq_length() == 0)
        and (mask is None or (torch.is_tensor(mask) and mask.ndim == 2))
    )
