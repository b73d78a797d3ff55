"""The vision tower replayed from CUDA graphs: a CLIP or SigLIP tower (the LLaVA families') is one forward of pixels
alone, so a graph captured once per pixel shape and call options serves every later encoding of that shape.

Eager, the tower costs about six times what its arithmetic needs at batch 1 (kernel launches); replayed, it costs
the arithmetic. A replay overwrites the graph's outputs, so each call hands back copies, made under a lock, of only
what the model reads (the last state, the pooled one and the hidden states at its `vision_feature_layer`; the
other hidden states come back as None). Towers whose forward reads sizes on the host (Qwen's ViT) and methods that
watch the tower's attention (VisionZip, HoliTom) run eagerly.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.utils import ModelOutput

from mmtoken.graphs.capture import capture, warm_up


@dataclass
class _TowerGraph:
    """One captured forward of the tower: its static pixels, the graph, and the outputs each replay rewrites."""

    pixels: torch.Tensor
    graph: torch.cuda.CUDAGraph
    output: ModelOutput


@dataclass
class _TowerGraphs:
    """A tower's graphs by pixel shape and options, and the lock their replays take. They outlive a patch (a graph
    reads only the tower's weights and its own memory), so every later patch replays them."""

    pool: object
    graphs: dict[tuple, _TowerGraph] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


_TOWERS: weakref.WeakKeyDictionary[nn.Module, _TowerGraphs] = weakref.WeakKeyDictionary()


class VisionGraphs:
    """Runs a vision tower's forward from CUDA graphs, one per pixel shape and call options, with `capture`; eagerly
    without (the same copies of the same outputs, which the CPU tests compare with the unpatched model). `read` are
    the indices of the hidden states the model takes from the tower."""

    def __init__(self, tower: nn.Module, read: tuple[int, ...], capture: bool) -> None:
        self.tower, self.read = tower, read
        self.pool = None
        if capture:
            self.known = _TOWERS.setdefault(tower, _TowerGraphs(torch.cuda.graph_pool_handle()))
            self.pool = self.known.pool
        self._original = type(tower).forward.__get__(tower)

    def attach(self) -> None:
        self.tower.forward = self._forward

    def detach(self) -> None:
        del self.tower.forward

    def _forward(self, pixel_values: torch.Tensor, **options: object) -> ModelOutput:
        if self.pool is None:
            return self._copies(self._original(pixel_values, **options))
        if any(torch.is_tensor(value) for value in options.values()):
            return self._original(pixel_values, **options)  # options that are data: no graph can hold them
        key = (tuple(pixel_values.shape), pixel_values.dtype, tuple(sorted(options.items())))
        with self.known.lock:
            graph = self.known.graphs.get(key)
            if graph is None:
                graph = self.known.graphs[key] = self._capture(pixel_values, options)
            graph.pixels.copy_(pixel_values)
            graph.graph.replay()
            return self._copies(graph.output)

    def _capture(self, pixel_values: torch.Tensor, options: dict) -> _TowerGraph:
        pixels = pixel_values.clone()

        def run() -> ModelOutput:
            return self._original(pixels, **options)

        warm_up(run)
        graph, output = capture(run, self.pool)
        return _TowerGraph(pixels, graph, output)

    def _copies(self, output: ModelOutput) -> ModelOutput:
        """A new output holding copies of what the model reads from `output` (one copy per distinct tensor)."""
        copies: dict[int, torch.Tensor] = {}

        def copy(tensor: torch.Tensor | None) -> torch.Tensor | None:
            if tensor is None:
                return None
            if id(tensor) not in copies:
                copies[id(tensor)] = tensor.clone()
            return copies[id(tensor)]

        fields = {"last_hidden_state": copy(output.last_hidden_state), "pooler_output": copy(output.pooler_output)}
        states = output.hidden_states
        if states is not None:
            read = {index % len(states) for index in self.read}
            fields["hidden_states"] = tuple(copy(state) if i in read else None for i, state in enumerate(states))
        return type(output)(**fields)
