"""Capturing a CUDA graph, as every graph of `mmtoken.graphs` is captured."""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import TypeVar

import torch

Output = TypeVar("Output")


def warm_up(run: Callable[[], object]) -> None:
    """Run `run()` once on a side stream, as a capture needs (kernels chosen, workspaces allocated)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream().wait_stream(side)


def capture(run: Callable[[], Output], pool: object) -> tuple[torch.cuda.CUDAGraph, Output]:
    """A CUDA graph of `run()`, its memory in `pool`, and what `run` returned: tensors each replay rewrites.
    Garbage collection is off meanwhile: a collection inside a capture could free CUDA objects, which invalidates
    it."""
    graph = torch.cuda.CUDAGraph()
    gc.disable()
    try:
        with torch.cuda.graph(graph, pool=pool):
            output = run()
    finally:
        gc.enable()
    return graph, output
