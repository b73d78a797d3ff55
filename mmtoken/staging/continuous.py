"""The scheduler with continuous batching: between two decode steps of the running batch, the requests that have
arrived (as many as there is room for, up to `max_batch` rows) are prefilled, their rows join the batch, and the
rows whose requests ended leave it (`mmtoken.staging.decoding`). A new request waits for one prefill, not for the
running batch to finish; the running requests wait one prefill per arrival, not one per batch."""

from __future__ import annotations

import time

import torch
from torch import nn

from mmtoken.api import handle_of
from mmtoken.methods.base import Method
from mmtoken.staging.batching import batch_key, collate, collate_encoded
from mmtoken.staging.decoding import Decoding, joined, prefill, step
from mmtoken.staging.encoders import Encoder, on_model
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
            groups: dict[tuple, list[Job]] = {}
            for job in arrivals:
                groups.setdefault(batch_key(job.inputs), []).append(job)
            for group in groups.values():
                self._admit(group)
            if self._running:
                self._step()

    def _admit(self, group: list[Job]) -> None:
        """Prefill `group` and join its rows to the running batch; where the prefill fails, each request alone, so
        one bad request costs only itself its answer."""
        try:
            admitted = self._prefill(group)
        except Exception as error:  # every accepted request gets an answer, never lost
            if len(group) > 1:
                for job in group:
                    self._admit([job])
            else:
                self._fail(group, error)
            return
        tokens, at = self._tokens(admitted)
        ended = [self._emit(job, token, at) for job, token in zip(group, tokens, strict=True)]
        keep = [row for row, end in enumerate(ended) if not end]
        try:
            self._decoding = joined(
                [self._decoding, admitted] if self._decoding is not None else [admitted],
                [list(range(len(self._running))), keep] if self._decoding is not None else [keep],
            )
        except Exception as error:
            self._fail(self._running + [group[row] for row in keep], error)
            return
        self._running += [group[row] for row in keep]

    @torch.no_grad()
    def _prefill(self, group: list[Job]) -> Decoding:
        started = time.perf_counter()
        encodings = []
        for job in group:
            job.started = started
            encodings.append(self.encoder.features(job))
            job.encoded = time.perf_counter()
        inputs = on_model(self.model, collate([job.inputs for job in group], self.pad_id))
        return prefill(self.model, inputs, collate_encoded(encodings))

    def _step(self) -> None:
        try:
            step(self.model, self._decoding)
            tokens, at = self._tokens(self._decoding)
        except Exception as error:
            self._fail(self._running, error)
            return
        keep = [row for row, (job, token) in enumerate(zip(self._running, tokens, strict=True))
                if not self._emit(job, token, at)]  # fmt: skip
        if len(keep) < len(self._running):
            self._decoding = joined([self._decoding], [keep])
            self._running = [self._running[row] for row in keep]

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

    def _fail(self, jobs: list[Job], error: Exception) -> None:
        failure = OutOfMemory(str(error)) if isinstance(error, torch.OutOfMemoryError) else error
        for job in jobs:
            job.future.set_exception(failure)
        failed = {id(job) for job in jobs}
        self._running = [job for job in self._running if id(job) not in failed]
        if not self._running:
            self._decoding = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
