"""The public entry points: patch, unpatch, patched."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from os import PathLike

import torch
from torch import nn
from transformers import Cache

from mmtoken.accounting.stats import Stats, cache_bytes, measure_stats
from mmtoken.engine.hooks import Engine
from mmtoken.graphs.decode import DecodeGraphs
from mmtoken.graphs.pooling import MatrixPooling
from mmtoken.graphs.prefill import PrefillGraphs
from mmtoken.graphs.segments import SegmentAttention
from mmtoken.graphs.vision import VisionGraphs
from mmtoken.integrations import adapter_for
from mmtoken.integrations.vision import VisionWatch
from mmtoken.methods import Method, build
from mmtoken.state import CallState

_ATTRIBUTE = "_mmtoken_handle"
_SUPPORTED_ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flash_attention_4")
_GRAPHED_ATTENTION = ("sdpa", "eager")


class Handle:
    """A method attached to a model. `stats` holds the numbers of the latest prefill (None before one); with
    `timing`, its prefill time too (measured between two device synchronisations, so off by default). With
    `cuda_graphs`, prefills and decode steps replay CUDA graphs (decode steps over KV caches of the pruned sizes),
    and so does the vision tower for the methods that do not read its attention; LLaVA-OneVision pools video frames
    with two matrix products, and Qwen's ViT attends within all its frames or windows in one call
    (`mmtoken.graphs`)."""

    def __init__(self, model: nn.Module, method: Method, timing: bool = False, cuda_graphs: bool = False) -> None:
        adapter = adapter_for(model)
        implementation = adapter.language_model.config._attn_implementation
        if implementation not in _SUPPORTED_ATTENTION:
            raise ValueError(f"attention {implementation!r} is not supported; use one of {_SUPPORTED_ATTENTION}")
        if cuda_graphs and any(getattr(step, "chunk_frames", None) for step in method.steps):
            raise ValueError("cuda_graphs does not take a streaming prefill (chunk_frames): its chunks run eagerly")
        if cuda_graphs and any(step.name == "h2o" for step in method.steps):
            raise ValueError(
                "cuda_graphs does not take h2o: its decode steps evict, and a graph's caches have fixed sizes"
            )
        if cuda_graphs and (implementation not in _GRAPHED_ATTENTION or next(model.parameters()).device.type != "cuda"):
            raise ValueError(f"cuda_graphs needs a model on a CUDA device with attention in {_GRAPHED_ATTENTION}")
        depth = len(adapter.decoder_layers)
        method.check_depth(depth)
        self.model, self.method, self.config, self.depth = model, method, adapter.language_model.config, depth
        watch = VisionWatch(adapter) if any(step.needs_vision for step in method.steps) else None
        self.graphs: list[DecodeGraphs | PrefillGraphs | VisionGraphs | MatrixPooling | SegmentAttention] = []
        if cuda_graphs:
            self.graphs.append(DecodeGraphs(model, adapter.language_model, capture=True))
            self.graphs.append(PrefillGraphs(adapter.language_model, method, capture=True))
            if adapter.pixel_tower is not None and watch is None:
                self.graphs.append(VisionGraphs(*adapter.pixel_tower, capture=True))
            if adapter.frame_pooling is not None:
                self.graphs.append(MatrixPooling(adapter.frame_pooling))
            tower = adapter.segmented_tower
            if tower is not None and tower.config._attn_implementation in _GRAPHED_ATTENTION:
                self.graphs.append(SegmentAttention(tower))
        self.engine = Engine(model, adapter, method, self, watch, timing)
        self._latest: tuple[CallState, float | None] | None = None
        self._stats: Stats | None = None
        self._kv_bytes = 0

    def prefilled(self, call: CallState, seconds: float | None) -> None:
        self._latest, self._stats = (call, seconds), None

    def stepped(self, cache: Cache) -> None:
        self._kv_bytes = cache_bytes(cache)

    @property
    def latest_call(self) -> CallState | None:
        """The token state of the latest prefill: which tokens each stretch of layers kept (None before one)."""
        return None if self._latest is None else self._latest[0]

    @property
    def stats(self) -> Stats | None:
        if self._latest is not None and self._stats is None:
            self._stats = measure_stats(self._latest[0], self.depth, self.config, self._latest[1], self._kv_bytes)
        if self._stats is not None:
            self._stats.kv_bytes = self._kv_bytes
        return self._stats

    def alive_visual_tokens(self) -> dict[int, list[torch.Tensor]] | None:
        """The visual tokens of the latest prefill (None before one) that survive at each stage: keyed by the first
        decoder layer of each stretch of layers that share a token set (0: what the language model receives), a
        list over batch rows of (n, 4) long tensors holding each surviving token's media index, frame, row and
        column in its patch grid (column -1 for a token without a grid cell: LLaVA's CLS or image_newline)."""
        return None if self._latest is None else self._latest[0].visual_geometry()

    @contextmanager
    def eager_vision_tower(self) -> Iterator[None]:
        """While open, the vision tower runs eagerly, not from its graphs (so hooks inside it see every call)."""
        towers = [graphs for graphs in self.graphs if isinstance(graphs, VisionGraphs)]
        for graphs in towers:
            graphs.detach()
        try:
            yield
        finally:
            for graphs in towers:
                graphs.attach()

    def attach(self) -> None:
        self.engine.attach()
        for graphs in self.graphs:
            graphs.attach()

    def remove(self) -> None:
        for graphs in reversed(self.graphs):
            graphs.detach()
        self.engine.detach()
        delattr(self.model, _ATTRIBUTE)


def patch(
    model: nn.Module,
    method: str | PathLike | dict | Method,
    *,
    timing: bool = False,
    cuda_graphs: bool = False,
    **params: object,
) -> Handle:
    """Attach `method` (a name with parameters, a dict or YAML path, or a Method) to an already-loaded model;
    with `timing`, `handle.stats.prefill_seconds` measures each prefill; with `cuda_graphs` (a model on a CUDA
    device, sdpa or eager attention), the language model's prefill (one graph per prefill signature, for methods
    whose counts are planned), its decode steps (over caches of the pruned sizes) and the vision tower (one graph per
    pixel shape, and for Qwen's ViT per grid sizes) replay CUDA graphs.

    Everything is checked before anything is attached: the method and its parameters, the model family, and
    that the schedule fits the model's depth.
    """
    if hasattr(model, _ATTRIBUTE):
        raise RuntimeError("this model is already patched by mmtoken; call mmtoken.unpatch(model) first")
    handle = Handle(model, build(method, **params), timing, cuda_graphs)
    handle.attach()
    setattr(model, _ATTRIBUTE, handle)
    return handle


def handle_of(model: nn.Module) -> Handle | None:
    """The handle of the patch on `model` (None when it is not patched)."""
    return getattr(model, _ATTRIBUTE, None)


def unpatch(model: nn.Module) -> None:
    """Remove mmtoken's hooks; the model is exactly as it was before `patch`."""
    handle = handle_of(model)
    if handle is None:
        raise RuntimeError("this model is not patched by mmtoken")
    handle.remove()


@contextmanager
def patched(
    model: nn.Module,
    method: str | PathLike | dict | Method,
    *,
    timing: bool = False,
    cuda_graphs: bool = False,
    **params: object,
) -> Iterator[Handle]:
    """`patch` for the length of a `with` block."""
    handle = patch(model, method, timing=timing, cuda_graphs=cuda_graphs, **params)
    try:
        yield handle
    finally:
        unpatch(model)
