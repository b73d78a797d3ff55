"""The encode stage in processes of its own, beside the language model's (prefill and decode) process, over
`torch.distributed`: NCCL where each process has a GPU of its own, gloo otherwise (processes sharing one GPU, and the
CPU). Launched with `torchrun --nproc-per-node N` (or `--nnodes N` across machines): the last rank runs the
scheduler, every other rank encodes; the scheduler sends each request's inputs, when it arrives, to the encoder with
the fewest requests pending and gets its encoding back, so encoding overlaps the batch that is decoding. Each
encoder keeps an embedding cache of its own."""

from __future__ import annotations

import itertools
import os
import threading
from concurrent.futures import Future
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._pytree import tree_map

from mmtoken.encoding import Encoded
from mmtoken.staging.embedding_cache import EmbeddingCache
from mmtoken.staging.encoders import encode_cached, on_model
from mmtoken.staging.jobs import Job
from mmtoken.staging.splitting import joined_parts, media_parts
from mmtoken.staging.transport import recv_tree, send_tree


@dataclass
class Stages:
    """This process's part of a staged deployment: its rank, the model's rank (the last), the device the transport
    moves tensors on, and per encoder rank one group per direction with the model's process (requests to it,
    encodings back), so a sending and a receiving thread never share one."""

    rank: int
    model_rank: int
    device: torch.device
    requests: dict[int, dist.ProcessGroup]
    encodings: dict[int, dist.ProcessGroup]

    @property
    def encodes(self) -> bool:
        return self.rank != self.model_rank

    @property
    def encoder_ranks(self) -> list[int]:
        return list(self.requests)


def start_stages() -> Stages:
    """Join the deployment `torchrun` launched (2 processes or more: the encoders and, last, the language model)."""
    world = int(os.environ.get("WORLD_SIZE", 0))
    if "RANK" not in os.environ or world < 2:
        raise SystemExit("a staged deployment runs as 2 processes or more (encoders, then the language model): "
                         "launch it with torchrun --nproc-per-node N ...")  # fmt: skip
    gpus = torch.cuda.device_count()
    own_gpus = gpus >= world  # NCCL takes one GPU per process
    backend = "nccl" if own_gpus else "gloo"
    rank = int(os.environ["RANK"])
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}" if own_gpus else "cpu")
    if own_gpus:
        torch.cuda.set_device(device)
    dist.init_process_group(backend)
    model_rank = world - 1
    requests, encodings = {}, {}
    for encoder in range(model_rank):  # every process creates every group, in one order
        requests[encoder] = dist.new_group([encoder, model_rank], backend=backend)
        encodings[encoder] = dist.new_group([encoder, model_rank], backend=backend)
    return Stages(rank, model_rank, device, requests, encodings)


def model_device(stages: Stages) -> torch.device:
    """Where this process's model runs: its own GPU, the one GPU both share, or the CPU."""
    if stages.device.type == "cuda":
        return stages.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.no_grad()
def serve_encodings(model: nn.Module, stages: Stages, cache: EmbeddingCache, settings: dict) -> None:
    """An encoder's loop: encode each request's media as it comes (through `cache` where the request asks, with
    the vision signal where its method reads it) and send the encoding back, or the error that stopped it, until
    the model's process says it is done."""
    model_rank, requests, encodings = stages.model_rank, stages.requests[stages.rank], stages.encodings[stages.rank]
    while (message := recv_tree(model_rank, requests, stages.device)) is not None:
        if message.get("clear"):
            if cache is not None:
                cache.clear()
            send_tree({"id": message["id"]}, model_rank, encodings, stages.device)
            continue
        job = Job(on_model(model, message["inputs"]), 1, media_key=message["key"])
        try:
            encoded = encode_cached(model, job, cache if message["cached"] else None, settings, message["signal"])
            reply = {"id": message["id"], "features": encoded.features, "signals": encoded.signals,
                     "hit": job.cache_hit, "rank": stages.rank}  # fmt: skip
        except Exception as error:  # the request gets this as its answer
            reply = {"id": message["id"], "error": f"{type(error).__name__}: {error}"}
        send_tree(reply, model_rank, encodings, stages.device)
    send_tree(None, model_rank, encodings, stages.device)  # the model's receiving thread ends


class RemoteEncoder:
    """The scheduler's encoder in the model's process: `submit` queues a request's media for the encoder processes,
    split in as many parts as there are encoders where they split (`mmtoken.staging.splitting`), each part to the
    encoder with the fewest pending; `features` waits for the parts and joins them, with their vision signals.
    `cached` and `signal` say whether the encoders go through their embedding caches and record the vision signal.
    Per encoder, a sending and a receiving thread each hold one group."""

    def __init__(self, model: nn.Module, stages: Stages, cached: bool = True, signal: bool = False) -> None:
        self.model, self.stages, self.cached, self.signal = model, stages, cached, signal
        self._pending: dict[object, Future] = {}
        self._parts: dict[int, int] = {}  # how many parts each submitted request went out in
        self._load = dict.fromkeys(stages.encoder_ranks, 0)
        self._outboxes: dict[int, list[dict | None]] = {rank: [] for rank in stages.encoder_ranks}
        self._ready = threading.Condition()
        self._threads = []
        for rank in stages.encoder_ranks:
            for target, role in ((self._send, "send"), (self._receive, "receive")):
                thread = threading.Thread(target=target, args=(rank,), name=f"mmtoken-encode-{role}-{rank}",
                                          daemon=True)  # fmt: skip
                thread.start()
                self._threads.append(thread)

    def _post(self, rank: int, identity: object, message: dict) -> Future:
        with self._ready:
            future = self._pending[identity] = Future()
            self._outboxes[rank].append(message)
            self._load[rank] += 1
            self._ready.notify_all()
        return future

    def submit(self, job: Job) -> None:
        parts = media_parts(job.inputs, len(self.stages.encoder_ranks))
        self._parts[job.id] = len(parts)
        for index, media in enumerate(parts):
            key = job.media_key if len(parts) == 1 else None
            message = {"id": (job.id, index), "key": key, "inputs": media, "cached": self.cached,
                       "signal": self.signal}  # fmt: skip
            with self._ready:
                least_busy = min(self._load, key=lambda rank: (self._load[rank], rank))
            self._post(least_busy, (job.id, index), message)

    def features(self, job: Job) -> Encoded:
        replies = []
        for index in range(self._parts.pop(job.id)):
            with self._ready:
                future = self._pending[job.id, index]
            replies.append(future.result())
            with self._ready:
                del self._pending[job.id, index]
        errors = [reply["error"] for reply in replies if "error" in reply]
        if errors:
            raise ValueError(f"the encoder could not encode this request's media: {errors[0]}")
        hits = [reply["hit"] for reply in replies]
        job.cache_hit = None if None in hits else all(hits)
        job.encoder = tuple(reply["rank"] for reply in replies)
        device = next(self.model.parameters()).device
        encodings = []
        for reply in replies:
            signals = {kind: [_to(item, device) for item in items] for kind, items in reply["signals"].items()}
            encodings.append(Encoded({kind: _to(value, device) for kind, value in reply["features"].items()}, signals))
        return joined_parts(encodings, getattr(self.model.model, "image_newline", None))

    def clear_cache(self) -> None:
        """Empty every encoder's embedding cache (between runs that must not share them)."""
        for rank in self.stages.encoder_ranks:
            identity = -next(_CONTROL)
            self._post(rank, identity, {"id": identity, "clear": True}).result()
            with self._ready:
                del self._pending[identity]

    def close(self) -> None:
        """Tell every encoder there is nothing more, once every queued request is sent, and wait for their goodbyes."""
        with self._ready:
            for outbox in self._outboxes.values():
                outbox.append(None)
            self._ready.notify_all()
        for thread in self._threads:
            thread.join()

    def _send(self, rank: int) -> None:
        while True:
            with self._ready:
                while not self._outboxes[rank]:
                    self._ready.wait()
                message = self._outboxes[rank].pop(0)
            send_tree(message, rank, self.stages.requests[rank], self.stages.device)
            if message is None:
                return

    def _receive(self, rank: int) -> None:
        while (reply := recv_tree(rank, self.stages.encodings[rank], self.stages.device)) is not None:
            with self._ready:
                future = self._pending[reply["id"]]
                self._load[rank] -= 1
            future.set_result(reply)


_CONTROL = itertools.count(1)


def _to(value: object, device: torch.device) -> object:
    return tree_map(lambda leaf: leaf.to(device) if torch.is_tensor(leaf) else leaf, value)
