"""The vision encoder's attention to each visual token, for the methods that rank by it (VisionZip, HoliTom).

transformers 5 returns no attention weights from its vision towers under sdpa, so a forward pre-hook on one
attention module of the tower recomputes them from that module's input with its own projections: the class
token's row where the tower has one (CLIP, as VisionZip, arXiv 2412.04467, reads it), else the mean attention each
token receives (SigLIP and the Qwen ViT, as HoliTom, arXiv 2505.21334, and VisPruner do). The adapter of each
family says which module, and how the tower's tokens become the prompt's visual tokens (class token, any-resolution
tiles, video pooling, Qwen's 2 x 2 merge and window order).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from weakref import WeakKeyDictionary

import torch
from torch import nn

from mmtoken.state import IMAGE, MEDIA, VIDEO, CallState

if TYPE_CHECKING:
    from mmtoken.integrations.base import Adapter

_QUERY_CHUNK = 256


def class_token_attention(attention: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """(batch, tokens): the head-averaged softmax attention of the class token (position 0) to every token,
    recomputed with the module's q/k projections from its input `hidden` (batch, tokens, dim)."""
    batch, length, _ = hidden.shape
    heads, dim = attention.num_heads, attention.head_dim
    query = attention.q_proj(hidden[:, :1]).view(batch, 1, heads, dim).transpose(1, 2)
    keys = attention.k_proj(hidden).view(batch, length, heads, dim).transpose(1, 2)
    logits = (query @ keys.transpose(2, 3)).float() * attention.scale
    return logits.softmax(-1).mean(1)[:, 0]


def received_attention(query: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """(batch, tokens): the softmax attention each token receives, averaged over heads and queries, from
    `query` and `keys` (batch, heads, tokens, dim); computed a block of queries at a time."""
    length = query.shape[2]
    total = torch.zeros(query.shape[0], length, device=query.device)
    for start in range(0, length, _QUERY_CHUNK):
        logits = (query[:, :, start : start + _QUERY_CHUNK] @ keys.transpose(2, 3)).float() * scale
        total += logits.softmax(-1).sum(2).mean(1)
    return total / length


def module_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a hooked attention module receives, passed by position or by name."""
    return args[0] if args else kwargs["hidden_states"]


def tower_attention(tower: nn.Module, feature_layer: int) -> nn.Module:
    """The attention module of the CLIP or SigLIP encoder layer whose output is `hidden_states[feature_layer]`."""
    if not isinstance(feature_layer, int):
        raise ValueError(f"the vision signal needs one vision_feature_layer, not {feature_layer}")
    layers = tower.encoder.layers
    index = feature_layer - 1 if feature_layer > 0 else len(layers) + feature_layer
    if not 0 <= index < len(layers):
        raise ValueError(f"vision_feature_layer {feature_layer} is not the output of an encoder layer")
    return layers[index].self_attn


def tower_signal(tower: nn.Module, attention: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """(images, tokens) for a CLIP or SigLIP tower: class-token attention if the tower has a class token, else
    received attention."""
    if hasattr(tower.embeddings, "class_embedding"):
        return class_token_attention(attention, hidden)
    batch, length, _ = hidden.shape
    shape = (batch, length, attention.num_heads, attention.head_dim)
    query = attention.q_proj(hidden).view(shape).transpose(1, 2)
    keys = attention.k_proj(hidden).view(shape).transpose(1, 2)
    return received_attention(query, keys, attention.scale)


def select_tower_tokens(tower: nn.Module, signal: torch.Tensor, strategy: str) -> torch.Tensor:
    """The signal of the tokens the model passes on: without the class token for the "default" strategy; with it,
    scored +inf so that it always stays, for "full"."""
    if not hasattr(tower.embeddings, "class_embedding"):
        return signal
    if strategy == "default":
        return signal[:, 1:]
    return torch.cat([torch.full_like(signal[:, :1], float("inf")), signal[:, 1:]], dim=1)


class TowerAttention:
    """For the LLaVA families: the signal of their CLIP or SigLIP `vision_tower`, at the `vision_feature_layer`;
    and the tower as a forward of pixels alone, read at that layer."""

    @property
    def pixel_tower(self) -> tuple[nn.Module, tuple[int, ...]]:
        layers = self.config.vision_feature_layer
        return self.model.base_model.vision_tower, (layers,) if isinstance(layers, int) else tuple(layers)

    @property
    def vision_attention(self) -> nn.Module:
        return tower_attention(self.model.base_model.vision_tower, self.config.vision_feature_layer)

    def vision_attention_signal(self, module: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
        return tower_signal(self.model.base_model.vision_tower, module, module_input(args, kwargs))


_RECORDINGS: ContextVar[WeakKeyDictionary[VisionWatch, _Recording] | None] = ContextVar(
    "mmtoken_vision_recordings", default=None
)


@dataclass
class _Recording:
    """What one watch recorded in one thread: the raw signals of the encoding running now, and the arranged
    signals of the encodings not yet taken, by kind."""

    raw: list[torch.Tensor] = field(default_factory=list)
    signals: dict[int, list[torch.Tensor]] = field(default_factory=lambda: {IMAGE: [], VIDEO: []})


class VisionWatch:
    """Records the vision signal of every image and video the model encodes, in the order the model scatters the
    features into the prompt, and hands it to the engine at prefill.

    The seam is the base model's `get_image_features` / `get_video_features`, which both `forward` and `generate`
    (when it encodes media before prefill) call: the watch wraps them on the instance, so it sees each call's
    arguments (tile layout, grids), while a pre-hook on the adapter's `vision_attention` module recomputes the
    attention. Each thread records its own (requests in other threads encode their own media). `detach` removes
    both.
    """

    def __init__(self, adapter: Adapter) -> None:
        self.adapter = adapter
        self.encoder = adapter.model.base_model
        self.attention = adapter.vision_attention
        self._wrapped: list[str] = []
        self._hook: torch.utils.hooks.RemovableHandle | None = None

    def attach(self) -> None:
        for kind, modality in MEDIA.items():
            name = f"get_{modality}_features"
            encode = getattr(self.encoder, name, None)
            if encode is not None:
                watched = functools.partial(self._watched, kind, encode, inspect.signature(encode))
                setattr(self.encoder, name, functools.update_wrapper(watched, encode))
                self._wrapped.append(name)
        self._hook = self.attention.register_forward_pre_hook(self._record, with_kwargs=True)

    def detach(self) -> None:
        for name in self._wrapped:
            delattr(self.encoder, name)
        self._wrapped = []
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _recording(self) -> _Recording:
        """This thread's recording of this watch."""
        recordings = _RECORDINGS.get()
        if recordings is None:
            recordings = WeakKeyDictionary()
            _RECORDINGS.set(recordings)
        return recordings.setdefault(self, _Recording())

    def _watched(self, kind: int, encode: Callable, signature: inspect.Signature, *args: object, **kwargs: object):
        recording = self._recording()
        recording.raw = []
        output = encode(*args, **kwargs)
        arguments = signature.bind(*args, **kwargs).arguments
        with torch.no_grad():
            raw = torch.cat(recording.raw)
            recording.signals[kind].append(self.adapter.arrange_vision_signal(kind, raw, arguments).float())
        return output

    def _record(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        with torch.no_grad():
            self._recording().raw.append(self.adapter.vision_attention_signal(module, args, kwargs))

    def taken(self) -> dict[int, list[torch.Tensor]]:
        """This thread's signals of the encodings not yet taken, by kind, in encoding order; forgets them."""
        recording = self._recording()
        signals, recording.signals = recording.signals, {IMAGE: [], VIDEO: []}
        return signals

    def replay(self, signals: dict[int, list[torch.Tensor]]) -> None:
        """Record `signals` (as `taken` returned them) as if their encodings ran now, in this thread."""
        for kind, arranged in signals.items():
            self._recording().signals[kind].extend(arranged)

    def take(self, call: CallState) -> torch.Tensor:
        """(batch, prompt length): the signal at every visual token of the call (0 elsewhere); forgets it."""
        signals = self.taken()
        signal = torch.zeros(call.kinds.shape, device=call.kinds.device)
        for kind, name in MEDIA.items():
            mask = (call.kinds == kind) & ~call.padding
            counts = mask.sum(1).tolist()
            recorded = _latest(signals[kind], sum(counts)).to(signal.device)
            if sum(counts) != len(recorded):
                recorded = _expanded(recorded, counts, name)
            signal.masked_scatter_(mask, recorded)
        return signal


def _latest(encoded: list[torch.Tensor], needed: int) -> torch.Tensor:
    """The signals of the latest encodings that together cover `needed` tokens (older ones are left over from a
    call that failed after its media were encoded); all of them if none does."""
    start, total = len(encoded), 0
    while start > 0 and total < needed:
        start -= 1
        total += len(encoded[start])
    chosen = encoded[start:] if total == needed else encoded
    return torch.cat(chosen) if chosen else torch.zeros(0)


def _expanded(recorded: torch.Tensor, counts: list[int], name: str) -> torch.Tensor:
    """`recorded` for a batch whose rows `generate` repeated after encoding (beam search: each row k times)."""
    total = sum(counts)
    copies = total // len(recorded) if len(recorded) else 0
    groups = [counts[start : start + copies] for start in range(0, len(counts), copies)] if copies else []
    if copies < 2 or total != copies * len(recorded) or any(len(set(group)) > 1 for group in groups):
        raise ValueError(
            f"the vision encoder's attention covers {len(recorded)} {name} tokens but the prompt holds {total}; "
            "this method needs the vision tower to run in the same call, or features encoded ahead with "
            "`mmtoken.encoding.encode(model, inputs, signal=True)` and fed with `mmtoken.encoding.feeding`"
        )
    rows = recorded.split([group[0] for group in groups])
    return torch.cat([row for row in rows for _ in range(copies)])
