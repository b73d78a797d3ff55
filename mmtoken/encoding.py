"""The encoder seam: a prompt's media through the vision tower and projector once (`encode`), then prefilled from
those features as often as needed (`feeding`), through the model's own forward and `generate` on every supported
transformers release (the model's `get_image_features` / `get_video_features` answer from the encoded features).

Where asked, `encode` also records the vision signal that VisionZip and HoliTom rank by (the vision encoder's
attention to each visual token), so those methods run on features encoded ahead of time as on pixels.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from mmtoken.api import handle_of
from mmtoken.integrations import adapter_for
from mmtoken.integrations.vision import VisionWatch
from mmtoken.state import FED, MEDIA


@dataclass
class Encoded:
    """A prompt's media through the vision tower and projector: the features the model's `get_image_features` /
    `get_video_features` returned (their `pooler_output`, all a prefill reads), and the vision signal recorded
    while they ran (as the vision watch arranges it; empty unless asked for), each by kind (`mmtoken.state.IMAGE`,
    `VIDEO`)."""

    features: dict[int, object]
    signals: dict[int, list[torch.Tensor]] = field(default_factory=dict)


@torch.no_grad()
def encode(model: nn.Module, inputs: dict, signal: bool = False) -> Encoded:
    """The media of `inputs` (the processor's output) through the vision tower and projector, as `forward` and
    `generate` encode them; with `signal`, also the vision encoder's attention that VisionZip and HoliTom read (the
    patch's own watch records it where the model is patched for such a method)."""
    if not signal:
        return Encoded(adapter_for(model).media_outputs(inputs))
    handle = handle_of(model)
    watch = None if handle is None else handle.engine.watch
    if watch is not None:
        watch.taken()  # forget what earlier encodings of this thread left
        features = adapter_for(model).media_outputs(inputs)
        return Encoded(features, watch.taken())
    watch = VisionWatch(adapter_for(model))
    watch.attach()
    try:
        with nullcontext() if handle is None else handle.eager_vision_tower():
            features = adapter_for(model).media_outputs(inputs)
        return Encoded(features, watch.taken())
    finally:
        watch.detach()


@contextmanager
def feeding(model: nn.Module, encoded: Encoded) -> Iterator[None]:
    """While open, the model's `get_image_features` / `get_video_features` return `encoded`'s features instead of
    running the vision tower (the inputs keep their pixels, which the model then only counts), and a patch that
    reads the vision signal gets the one `encode` recorded. Only in this thread: another (an encoder thread) still
    encodes."""
    base, saved = model.model, {}
    handle = handle_of(model)
    watch = None if handle is None else handle.engine.watch
    feeder = threading.get_ident()
    for kind, output in encoded.features.items():
        name = f"get_{MEDIA[kind]}_features"
        saved[name] = base.__dict__.get(name)  # the wrapper a patch put there, or None
        running = getattr(base, name)

        def answer(
            *args: object, output: object = output, kind: int = kind, running: Callable = running, **kwargs: object
        ) -> object:
            if threading.get_ident() != feeder:
                return running(*args, **kwargs)
            if watch is not None:
                watch.replay({kind: encoded.signals.get(kind, [])})
            return output

        # the original's signature, which `generate` reads to pick the arguments it passes (and then drops)
        setattr(base, name, functools.wraps(running)(answer))
    fed = FED.set(frozenset(encoded.features))
    try:
        yield
    finally:
        FED.reset(fed)
        for name, previous in saved.items():
            if previous is None:
                delattr(base, name)
            else:
                setattr(base, name, previous)
