"""The scheduler with continuous batching: between two decode steps of the running batch, the requests that have
arrived (as many as there is room for, up to `max_batch` rows) are prefilled, their rows join the batch, and the
rows whose requests ended leave it (`mmtoken.staging.decoding`). A new request waits for one prefill, not for the
running batch to finish; the running requests wait one prefill per arrival, not one per batch."""

from __future__ import annotations

import threading
import time
from contextlib import AbstractContextManager, nullcontext
from functools import partial

import torch
from torch import nn
from transformers import DynamicCache

from mmtoken.api import handle_of
from mmtoken.engine.request import request_of
from mmtoken.integrations import adapter_for
from mmtoken.methods.base import Method
from mmtoken.staging.batching import grouped
from mmtoken.staging.chunked import ChunkedLanguageModel, InChunks, check_chunkable
from mmtoken.staging.decoding import Decoding, joined, prefill, step
from mmtoken.staging.encoders import Encoder
from mmtoken.staging.jobs import Job
from mmtoken.staging.scheduler import OutOfMemory, Scheduler


def check_joinable(method: Method, cuda_graphs: bool = False) -> None:
    """Raise a ValueError where requests patched with `method` cannot join a decoding batch: a `cuda_graphs` patch
    fixes its caches' sizes, and h2o evicts by attention sums per batch."""
    if cuda_graphs:
        raise ValueError("continuous batching joins caches of different sizes; a cuda_graphs patch fixes them")
    if any(step.name == "h2o" for step in method.steps):
        raise ValueError("continuous batching does not take h2o: its decode steps evict by per-batch attention")


class ContinuousScheduler(Scheduler):
    """Runs requests for `model` with continuous batching (see the module); greedy decoding, as `Scheduler`. Not
    for a model patched with `cuda_graphs` (its caches have fixed sizes) or with a method that evicts while
    decoding (h2o): their rows decode as the batch they were prefilled in."""

    def __init__(self, model: nn.Module, processor: object, encoder: Encoder, max_batch: int = 8,
                 max_waiting: int = 64) -> None:  # fmt: skip
        handle = handle_of(model)
        if handle is not None:
            check_joinable(handle.method, bool(handle.graphs))
        if any(layer.is_sliding for layer in DynamicCache(config=model.config.get_text_config()).layers):
            raise ValueError("continuous batching joins caches row by row; this model's sliding-window layers crop "
                             "each row's cache on its own: use static batching")  # fmt: skip
        super().__init__(model, processor, encoder, max_batch, max_waiting)
        self._running: list[Job] = []
        self._decoding: Decoding | None = None

    def _arrivals(self) -> list[Job] | None:
        """The waiting requests there is room for, the oldest first (waiting for one while nothing runs); None once
        the scheduler is closed and nothing is left to do."""
        with self._wake:
            while not self._waiting and not self._running:
                if self._closed:
                    return None
                self._wake.wait()
            room = self.max_batch - len(self._running)
            arrivals = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
            return arrivals

    def _loop(self) -> None:
        while (arrivals := self._arrivals()) is not None:
            for prefilled in self._prefilled(arrivals):
                self._join(*prefilled)
            if self._running:
                self._step()

    def _prefilled(self, arrivals: list[Job]) -> list[tuple[list[Job], Decoding]]:
        """`arrivals` prefilled, in groups that can share a batch, with their first tokens handed out: per group the
        requests that go on and their rows. Where a group's prefill fails, each of its requests runs alone, so one
        bad request costs only itself its answer."""
        out = []
        for group in grouped(arrivals):
            try:
                decoding = self._prefill(group)
                tokens, at = self._tokens(decoding)
            except Exception as error:  # every accepted request gets an answer, never lost
                if len(group) == 1:
                    group[0].encoding = None
                    self._answer(group, error)
                else:
                    out += [prefilled for job in group for prefilled in self._prefilled([job])]
                continue
            for job in group:
                job.encoding = None
            ended = [self._emit(job, token, at) for job, token in zip(group, tokens, strict=True)]
            keep = [row for row, end in enumerate(ended) if not end]
            if not keep:
                continue
            going = [group[row] for row in keep]
            try:
                rows = decoding if len(keep) == len(group) else joined([decoding], [keep])
            except Exception as error:  # out of memory, say: the requests that go on get it as their answer
                self._answer(going, error)
                continue
            out.append((going, rows))
        return out

    def _join(self, jobs: list[Job], decoding: Decoding) -> None:
        """Join prefilled rows to the running batch; where the join fails (out of memory, say), the new rows get
        the error and the running batch goes on as it was (a join builds a new batch, it changes none)."""
        if self._decoding is None:
            self._decoding, self._running = decoding, list(jobs)
            return
        try:
            everyone = [list(range(len(self._running))), list(range(decoding.size))]
            self._decoding = joined([self._decoding, decoding], everyone)
        except Exception as error:
            self._answer(jobs, error)
            return
        self._running += jobs

    def _prefill(self, group: list[Job]) -> Decoding:
        return prefill(self.model, *self._batch_inputs(group))

    def _step(self) -> None:
        try:
            step(self.model, self._decoding)
            tokens, at = self._tokens(self._decoding)
        except Exception as error:
            self._fail(self._running, error)
            return
        ended = [self._emit(job, token, at) for job, token in zip(self._running, tokens, strict=True)]
        keep = [row for row, end in enumerate(ended) if not end]
        if len(keep) < len(self._running):
            going = [self._running[row] for row in keep]
            try:
                self._decoding = joined([self._decoding], [keep])
            except Exception as error:  # out of memory, say: the rows that go on get it as their answer
                self._answer(going, error)
                self._decoding, going = None, []
            self._running = going

    def _tokens(self, decoding: Decoding) -> tuple[list[int], float]:
        """Each row's new token, and when they were there."""
        tokens = decoding.tokens.tolist()
        return tokens, time.perf_counter()

    def _emit(self, job: Job, token: int, at: float) -> bool:
        """Hand `job` its new token; True when the request has ended (its end of sequence, or its limit)."""
        if token not in self.end_ids:
            job.emit(token, at)
        if token in self.end_ids or job.done:
            job.finished = at
            job.future.set_result(list(job.tokens))
            return True
        return False

    def _answer(self, jobs: list[Job], error: Exception) -> None:
        """End `jobs` with `error` as their answer (an out-of-memory one as `OutOfMemory`)."""
        failure = OutOfMemory(str(error)) if isinstance(error, torch.OutOfMemoryError) else error
        for job in jobs:
            job.future.set_exception(failure)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _fail(self, jobs: list[Job], error: Exception) -> None:
        """End running `jobs` with `error` and take them out of the batch."""
        self._answer(jobs, error)
        failed = {id(job) for job in jobs}
        self._running = [job for job in self._running if id(job) not in failed]
        if not self._running:
            self._decoding = None


class OverlappedScheduler(ContinuousScheduler):
    """Continuous batching whose prefills overlap the decode steps: a thread of its own prefills the arrivals on a
    CUDA stream of low priority while the running batch decodes on one of high priority, and the prefilled rows
    join the batch at its next step, so a long prompt's prefill delays the running requests' tokens only by what
    the device cannot run beside them (the "stages as streams with priorities" of EPD staging on one GPU). On the
    CPU the two threads share the cores."""

    def __init__(self, model: nn.Module, processor: object, encoder: Encoder, max_batch: int = 8,
                 max_waiting: int = 64) -> None:  # fmt: skip
        super().__init__(model, processor, encoder, max_batch, max_waiting)
        self._ready: list[tuple[list[Job], Decoding, torch.cuda.Event | None]] = []
        self._prefilling = 0
        cuda = self.device.type == "cuda"
        self._decode_stream = torch.cuda.Stream(self.device, priority=-1) if cuda else None
        self._prefill_stream = torch.cuda.Stream(self.device, priority=0) if cuda else None
        self._prefiller = threading.Thread(target=self._prefill_loop, name="mmtoken-prefill", daemon=True)

    def start(self) -> OverlappedScheduler:
        super().start()
        self._prefiller.start()
        return self

    def close(self) -> None:
        super().close()
        if self._prefiller.is_alive():
            self._prefiller.join()

    def _rows_in_flight(self) -> int:
        return len(self._running) + self._prefilling + sum(len(jobs) for jobs, _, _ in self._ready)

    def _prefill_loop(self) -> None:
        with _on(self._prefill_stream):
            while True:
                with self._wake:
                    while not self._waiting or self._rows_in_flight() >= self.max_batch:
                        if self._closed and not self._waiting:
                            self._wake.notify_all()
                            return
                        self._wake.wait()
                    room = self.max_batch - self._rows_in_flight()
                    arrivals = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
                    self._prefilling += len(arrivals)
                prefilled = self._prefilled(arrivals)
                done = None
                if self._prefill_stream is not None:
                    done = torch.cuda.Event()
                    done.record(self._prefill_stream)
                with self._wake:
                    self._ready += [(jobs, decoding, done) for jobs, decoding in prefilled]
                    self._prefilling -= len(arrivals)
                    self._wake.notify_all()

    def _loop(self) -> None:
        with _on(self._decode_stream):
            while True:
                with self._wake:
                    while not self._ready and not self._running:
                        if self._closed and not self._waiting and not self._prefilling:
                            return
                        self._wake.wait()
                    ready, self._ready = self._ready, []
                for jobs, decoding, done in ready:
                    if done is not None:  # made on the prefill stream, read on this one from now on
                        self._decode_stream.wait_event(done)
                        for tensor in _tensors(decoding):
                            tensor.record_stream(self._decode_stream)
                    self._join(jobs, decoding)
                if self._running:
                    before = len(self._running)
                    self._step()
                    if len(self._running) < before:
                        with self._wake:
                            self._wake.notify_all()  # room for the waiting


class ChunkedScheduler(ContinuousScheduler):
    """Continuous batching whose prefills run `chunk_tokens` tokens of the prompt at a time, the running batch
    decoding one step between two chunks (`mmtoken.staging.chunked`, after Sarathi-Serve): a long prompt that
    arrives delays each token of the running requests by one chunk, not by its whole prefill; its own first token
    comes after all its chunks. With no row decoding, a prompt (or the rest of it) prefills at once. One group of
    arrivals prefills at a time. Unpatched models and methods that cut before the language model only (a cut inside
    it ranks by attention over the whole prompt)."""

    def __init__(self, model: nn.Module, processor: object, encoder: Encoder, max_batch: int = 8,
                 max_waiting: int = 64, chunk_tokens: int = 512) -> None:  # fmt: skip
        super().__init__(model, processor, encoder, max_batch, max_waiting)
        handle, adapter = handle_of(model), adapter_for(model)
        if handle is not None:
            check_chunkable(handle.method, len(adapter.decoder_layers))
        self._chunked = ChunkedLanguageModel(adapter.language_model, chunk_tokens)
        self._prefilling: InChunks[list[tuple[list[Job], Decoding]]] | None = None

    def start(self) -> ChunkedScheduler:
        self._chunked.attach()
        return super().start()

    def close(self) -> None:
        super().close()
        self._chunked.detach()

    def _loop(self) -> None:
        groups: list[list[Job]] = []  # arrivals let in, each group to prefill in chunks of its own
        while True:
            if self._prefilling is None:
                if not groups:
                    arrivals = self._arrivals()
                    if arrivals is None:
                        return
                    groups = grouped(arrivals)
                if groups:  # split only while rows decode: alone, a prompt prefills at once
                    prefilling = partial(self._prefilled, groups.pop(0))
                    self._prefilling = self._chunked.in_chunks(prefilling, split=bool(self._running))
            elif self._prefilling.advance(split=bool(self._running)):
                for prefilled in self._prefilling.result():
                    self._join(*prefilled)
                self._prefilling = None
            if self._running:
                self._step()


def _on(stream: torch.cuda.Stream | None) -> AbstractContextManager:
    return nullcontext() if stream is None else torch.cuda.stream(stream)


def _tensors(decoding: Decoding) -> list[torch.Tensor]:
    """Every tensor a prefilled batch of rows holds: its cache, its records, its positions, tokens and mask."""
    cache = decoding.rows.cache
    tensors = [tensor for layer in cache.layers for tensor in (layer.keys, layer.values)]
    request = request_of(cache)
    if request is not None:
        tensors += [request.call.kinds, request.call.padding]
        for record in {id(record): record for record in request.records}.values():
            tensors += [record.slot, record.valid, record.entries_valid()]
    return [*tensors, decoding.positions, decoding.tokens, decoding.rows.seen]


BATCHING: dict[str, type[Scheduler]] = {
    "static": Scheduler,
    "continuous": ContinuousScheduler,
    "overlapped": OverlappedScheduler,
    "chunked": ChunkedScheduler,
}


def make_scheduler(batching: str, model: nn.Module, processor: object, encoder: Encoder, max_batch: int,
                   max_waiting: int, chunk_tokens: int = 512) -> Scheduler:  # fmt: skip
    """The scheduler of `BATCHING[batching]`; `chunk_tokens` is the chunked one's chunk size."""
    chunking = {"chunk_tokens": chunk_tokens} if batching == "chunked" else {}
    return BATCHING[batching](model, processor, encoder, max_batch, max_waiting, **chunking)
