"""The vision tower replayed from CUDA graphs: a CLIP or SigLIP tower (the LLaVA families') is one forward of pixels
alone, so a graph captured once per pixel shape and call options serves every later encoding of that shape.

Qwen's ViT also takes the grid of each image or video, from which its forward derives positions, segment bounds
and (Qwen2.5-VL) the window order with host loops and reads. Here they are computed ahead from the grid's sizes
(transformers' `vision_utils`, whose functions take them precomputed) and handed to the forward, so with its
attention over all segments at once (`mmtoken.graphs.segments`) it reads nothing back; its graphs are per pixel
shape and grid sizes.

Eager, the tower costs about six times what its arithmetic needs at batch 1 (kernel launches); replayed, it costs
the arithmetic. A replay overwrites the graph's outputs, so each call hands back copies, made under a lock, of only
what the model reads (the last state, the pooled one and the hidden states at its `vision_feature_layer`; the
other hidden states come back as None). Methods that watch the tower's attention (VisionZip, HoliTom) run it
eagerly.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.utils import ModelOutput
from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

from mmtoken.graphs.capture import capture, warm_up


@dataclass
class _TowerGraph:
    """One captured forward of the tower: its static pixels, the other inputs it reads (the grid and what was
    computed from it, which must live as long as the graph), the graph, and the outputs each replay rewrites."""

    pixels: torch.Tensor
    inputs: dict[str, object]
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
        grid = options.get("grid_thw")
        if self.pool is None:
            return self._copies(self._original(pixel_values, **options, **self._from_grid(grid)))
        others = {name: value for name, value in options.items() if name != "grid_thw"}
        if any(torch.is_tensor(value) for value in others.values()):
            return self._original(pixel_values, **options)  # options that are data: no graph can hold them
        sizes = None if grid is None else tuple(map(tuple, grid.tolist()))
        key = (tuple(pixel_values.shape), pixel_values.dtype, sizes, tuple(sorted(others.items())))
        with self.known.lock:
            graph = self.known.graphs.get(key)
            if graph is None:
                graph = self.known.graphs[key] = self._capture(pixel_values, options)
            graph.pixels.copy_(pixel_values)
            graph.graph.replay()
            return self._copies(graph.output)

    def _from_grid(self, grid: torch.Tensor | None) -> dict[str, object]:
        """What a Qwen ViT's forward would derive from its `grid` (t, h, w per item) on the host, computed here, on
        the tower's device; nothing for a tower without a grid."""
        if grid is None:
            return {}
        tower, device = self.tower, grid.device
        derived = {"position_ids": get_vision_position_ids(grid, tower.spatial_merge_size),
                   "cu_seqlens": get_vision_cu_seqlens(grid)}  # fmt: skip
        if hasattr(tower, "window_size"):  # Qwen2.5-VL attends within windows in most layers
            derived["window_index"], derived["cu_window_seqlens"] = get_vision_window_index(
                grid, tower.spatial_merge_size, tower.window_size, tower.patch_size
            )
            derived["max_window_seqlen"] = int(derived["cu_window_seqlens"].diff().max())
        derived["max_seqlen"] = int(derived["cu_seqlens"].diff().max())
        return {name: value.to(device) if torch.is_tensor(value) else value for name, value in derived.items()}

    def _capture(self, pixel_values: torch.Tensor, options: dict) -> _TowerGraph:
        pixels = pixel_values.clone()
        static = {name: value.clone() if torch.is_tensor(value) else value for name, value in options.items()}
        static |= self._from_grid(static.get("grid_thw"))

        def run() -> ModelOutput:
            return self._original(pixels, **static)

        warm_up(run)
        graph, output = capture(run, self.pool)
        return _TowerGraph(pixels, static, graph, output)

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
