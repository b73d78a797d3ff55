"""The encode stage in a process of its own, beside the language model's (prefill and decode) process, over
`torch.distributed`: NCCL where each process has a GPU of its own, gloo otherwise (processes sharing one GPU, and the
CPU). Launched with `torchrun --nproc-per-node 2` (or `--nnodes 2` across machines): rank 0 encodes, rank 1 runs the
scheduler, which sends each request's inputs to rank 0 when it arrives and gets its encoding back, so encoding
overlaps the batch that is decoding."""

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
from mmtoken.staging.transport import recv_tree, send_tree

ENCODE_RANK, MODEL_RANK = 0, 1


@dataclass
class Stages:
    """This process's part of a staged deployment: its rank, the device the transport moves tensors on, and one
    group per direction (requests to the encoder, encodings back), so a sending and a receiving thread never
    share one."""

    rank: int
    device: torch.device
    requests: dist.ProcessGroup
    encodings: dist.ProcessGroup

    @property
    def encodes(self) -> bool:
        return self.rank == ENCODE_RANK


def start_stages() -> Stages:
    """Join the deployment `torchrun` launched (2 processes: the encoder and the language model)."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", 0)) != 2:
        raise SystemExit("a staged deployment runs as 2 processes: launch it with torchrun --nproc-per-node 2 ...")
    gpus = torch.cuda.device_count()
    own_gpus = gpus >= 2  # NCCL takes one GPU per process
    backend = "nccl" if own_gpus else "gloo"
    rank = int(os.environ["RANK"])
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}" if own_gpus else "cpu")
    if own_gpus:
        torch.cuda.set_device(device)
    dist.init_process_group(backend)
    ranks = [ENCODE_RANK, MODEL_RANK]
    return Stages(rank, device, dist.new_group(ranks, backend=backend), dist.new_group(ranks, backend=backend))


def model_device(stages: Stages) -> torch.device:
    """Where this process's model runs: its own GPU, the one GPU both share, or the CPU."""
    if stages.device.type == "cuda":
        return stages.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.no_grad()
def serve_encodings(model: nn.Module, stages: Stages, cache: EmbeddingCache, settings: dict) -> None:
    """The encoder's loop (rank 0): encode each request's media as it comes (through `cache` where the request
    asks, with the vision signal where its method reads it) and send the encoding back, or the error that stopped
    it, until the model's process says it is done."""
    while (message := recv_tree(MODEL_RANK, stages.requests, stages.device)) is not None:
        if message.get("clear"):
            if cache is not None:
                cache.clear()
            send_tree({"id": message["id"]}, MODEL_RANK, stages.encodings, stages.device)
            continue
        job = Job(on_model(model, message["inputs"]), 1, media_key=message["key"])
        try:
            encoded = encode_cached(model, job, cache if message["cached"] else None, settings, message["signal"])
            reply = {"id": message["id"], "features": encoded.features, "signals": encoded.signals,
                     "hit": job.cache_hit}  # fmt: skip
        except Exception as error:  # the request gets this as its answer
            reply = {"id": message["id"], "error": f"{type(error).__name__}: {error}"}
        send_tree(reply, MODEL_RANK, stages.encodings, stages.device)
    send_tree(None, MODEL_RANK, stages.encodings, stages.device)  # the model's receiving thread ends


class RemoteEncoder:
    """The scheduler's encoder in the model's process (rank 1): `submit` queues a request's media for rank 0,
    `features` waits for its encoding; `cached` and `signal` say whether rank 0 goes through its embedding cache
    and records the vision signal. A sending and a receiving thread each hold one group."""

    def __init__(self, model: nn.Module, stages: Stages, cached: bool = True, signal: bool = False) -> None:
        self.model, self.stages, self.cached, self.signal = model, stages, cached, signal
        self._pending: dict[int, Future] = {}
        self._outbox: list[dict | None] = []
        self._ready = threading.Condition()
        self._sender = threading.Thread(target=self._send, name="mmtoken-encode-send", daemon=True)
        self._receiver = threading.Thread(target=self._receive, name="mmtoken-encode-receive", daemon=True)
        self._sender.start()
        self._receiver.start()

    def _post(self, identity: int, message: dict | None) -> Future:
        with self._ready:
            future = self._pending[identity] = Future()
            self._outbox.append(message)
            self._ready.notify()
        return future

    def submit(self, job: Job) -> None:
        media = {name: value for name, value in job.inputs.items() if name not in ("input_ids", "attention_mask")}
        self._post(job.id, {"id": job.id, "key": job.media_key, "inputs": media, "cached": self.cached,
                            "signal": self.signal})  # fmt: skip

    def features(self, job: Job) -> Encoded:
        with self._ready:
            future = self._pending[job.id]
        reply = future.result()
        with self._ready:
            del self._pending[job.id]
        if "error" in reply:
            raise ValueError(f"the encoder could not encode this request's media: {reply['error']}")
        job.cache_hit = reply["hit"]
        device = next(self.model.parameters()).device
        signals = {kind: [_to(item, device) for item in items] for kind, items in reply["signals"].items()}
        return Encoded({kind: _to(value, device) for kind, value in reply["features"].items()}, signals)

    def clear_cache(self) -> None:
        """Empty the encoder's embedding cache (between runs that must not share it)."""
        identity = -next(_CONTROL)
        self._post(identity, {"id": identity, "clear": True}).result()
        with self._ready:
            del self._pending[identity]

    def close(self) -> None:
        """Tell the encoder there is nothing more, once every queued request is sent, and wait for its goodbye."""
        with self._ready:
            self._outbox.append(None)
            self._ready.notify()
        self._sender.join()
        self._receiver.join()

    def _send(self) -> None:
        while True:
            with self._ready:
                while not self._outbox:
                    self._ready.wait()
                message = self._outbox.pop(0)
            send_tree(message, ENCODE_RANK, self.stages.requests, self.stages.device)
            if message is None:
                return

    def _receive(self) -> None:
        while (reply := recv_tree(ENCODE_RANK, self.stages.encodings, self.stages.device)) is not None:
            with self._ready:
                future = self._pending[reply["id"]]
            future.set_result(reply)


_CONTROL = itertools.count(1)


def _to(value: object, device: torch.device) -> object:
    return tree_map(lambda leaf: leaf.to(device) if torch.is_tensor(leaf) else leaf, value)
