"""The scheduler of the prefill and decode stages: requests wait in a bounded queue; a thread takes the oldest and
the waiting requests that can share its batch (up to `max_batch`), gets their encodings from the encoder, and
prefills and decodes them together with one `generate` on the encoded features, under the model's mmtoken patch
if it has one. Each request's tokens reach it as they come. A request's batch starts when the previous batch has
finished (static batching: a new request never joins a batch that is decoding)."""

from __future__ import annotations

import threading
import time
from collections import deque

import torch
from torch import nn
from transformers.generation.streamers import BaseStreamer

from mmtoken.encoding import Encoded, feeding
from mmtoken.staging.batching import batch_key, collate, collate_encoded
from mmtoken.staging.encoders import Encoder, on_model
from mmtoken.staging.jobs import Job


class Overloaded(RuntimeError):
    """The queue is full: the request is refused before any work (HTTP 429)."""


class OutOfMemory(RuntimeError):
    """The request alone ran out of device memory (HTTP 503); it was accepted and gets this as its answer."""


class _RowStreamer(BaseStreamer):
    """Hands each row's new token to its job, until the row's end of sequence or its own limit."""

    def __init__(self, jobs: list[Job], end_ids: set[int], synchronize: bool) -> None:
        self.jobs, self.end_ids, self.synchronize = jobs, end_ids, synchronize
        self.ended = [False] * len(jobs)
        self._prompt = True

    def put(self, value: torch.Tensor) -> None:
        if self._prompt:
            self._prompt = False
            return
        if self.synchronize:
            torch.cuda.synchronize()
        at = time.perf_counter()
        for row, token in enumerate(value.reshape(-1).tolist()):
            job = self.jobs[row]
            if self.ended[row] or job.done:
                continue
            if token in self.end_ids:
                self.ended[row] = True
            else:
                job.emit(token, at)

    def end(self) -> None:
        pass


class _CudnnAttentionOff:
    """Keeps sdpa from cuDNN's attention while any scheduler runs, and gives back the setting found when the first
    one started once the last one has closed. cuDNN plans its attention anew for every key length, which on an H100
    (torch 2.11) cost each of a decode step's calls about 2.4 ms of host time, twice the step of a 7B model."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holders = 0
        self._setting = True

    def hold(self) -> None:
        with self._lock:
            if self._holders == 0:
                self._setting = torch.backends.cuda.cudnn_sdp_enabled()
                torch.backends.cuda.enable_cudnn_sdp(False)
            self._holders += 1

    def release(self) -> None:
        with self._lock:
            self._holders -= 1
            if self._holders == 0:
                torch.backends.cuda.enable_cudnn_sdp(self._setting)


_CUDNN_ATTENTION_OFF = _CudnnAttentionOff()


class Scheduler:
    """Batches and runs requests for `model` (and its `processor`'s tokenizer), encodings from `encoder`. While it
    runs, sdpa does not use cuDNN's attention (`_CudnnAttentionOff`)."""

    def __init__(self, model: nn.Module, processor: object, encoder: Encoder, max_batch: int = 8,
                 max_waiting: int = 64) -> None:  # fmt: skip
        if max_batch < 1 or max_waiting < 1:
            raise ValueError(f"max_batch and max_waiting must be >= 1, got {max_batch} and {max_waiting}")
        self.model, self.encoder = model, encoder
        self.max_batch, self.max_waiting = max_batch, max_waiting
        tokenizer = processor.tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        end = model.generation_config.eos_token_id
        self.end_ids = set(end if isinstance(end, list) else [] if end is None else [end])
        self.device = next(model.parameters()).device
        self._waiting: deque[Job] = deque()
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="mmtoken-scheduler", daemon=True)
        self._holds_cudnn_setting = False

    def start(self) -> Scheduler:
        """Start running the queued requests and those that come."""
        if self._thread.ident is not None:
            raise RuntimeError("the scheduler has started already (a scheduler runs once)")
        _CUDNN_ATTENTION_OFF.hold()
        self._holds_cudnn_setting = True
        self._thread.start()
        return self

    def submit(self, job: Job) -> Job:
        """Queue `job` (its future resolves with its tokens); raises `Overloaded` when the queue is full."""
        with self._wake:
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            if len(self._waiting) >= self.max_waiting:
                raise Overloaded(f"{len(self._waiting)} requests are waiting (the most this server queues)")
            self.encoder.submit(job)
            self._waiting.append(job)
            self._wake.notify_all()
        return job

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def close(self) -> None:
        """Finish every queued request, then stop."""
        with self._wake:
            self._closed = True
            self._wake.notify_all()
        if self._thread.is_alive():
            self._thread.join()
        if self._holds_cudnn_setting:
            _CUDNN_ATTENTION_OFF.release()
            self._holds_cudnn_setting = False

    def _next_batch(self) -> list[Job] | None:
        with self._wake:
            while not self._waiting:
                if self._closed:
                    return None
                self._wake.wait()
            key = batch_key(self._waiting[0].inputs)
            batch = [job for job in self._waiting if batch_key(job.inputs) == key][: self.max_batch]
            for job in batch:
                self._waiting.remove(job)
            return batch

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            self._run_or_split(batch)

    def _run_or_split(self, batch: list[Job]) -> None:
        """Run `batch`; where it fails, each request alone, so one bad request costs only itself its answer."""
        try:
            self._run(batch)
        except Exception as error:  # every accepted request gets an answer, never lost
            if len(batch) > 1:
                for job in batch:
                    job.tokens.clear()
                    job.token_times.clear()
                    self._run_or_split([job])
                return
            failure = OutOfMemory(str(error)) if isinstance(error, torch.OutOfMemoryError) else error
            batch[0].encoding = None
            batch[0].future.set_exception(failure)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            return
        for job in batch:
            job.encoding = None
            job.future.set_result(list(job.tokens))

    def _batch_inputs(self, batch: list[Job]) -> tuple[dict, Encoded]:
        """The batch's inputs, left-padded on the model's device, and its encodings from the encoder, as the batch
        starts (each request's start and encoding times recorded). Each request's encoding is asked for once: an
        encoder process hands it out once, and a request that runs again alone gets the same (or the same error)."""
        started = time.perf_counter()
        encodings = []
        for job in batch:
            if job.encoding is None:  # not yet asked: a request that runs again alone keeps what it got
                job.started = started
                try:
                    job.encoding = self.encoder.features(job)
                except Exception as error:  # the request's answer, once its batch has run without it
                    job.encoding = error
                job.encoded = time.perf_counter()
            if isinstance(job.encoding, Exception):
                raise job.encoding
            encodings.append(job.encoding)
        return on_model(self.model, collate([job.inputs for job in batch], self.pad_id)), collate_encoded(encodings)

    @torch.no_grad()
    def _run(self, batch: list[Job]) -> None:
        inputs, encoded = self._batch_inputs(batch)
        streamer = _RowStreamer(batch, self.end_ids, self.device.type == "cuda")
        new_tokens = max(job.max_tokens for job in batch)
        with feeding(self.model, encoded):
            self.model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, streamer=streamer,
                                pad_token_id=self.pad_id)  # fmt: skip
        for job in batch:
            job.finished = time.perf_counter()
