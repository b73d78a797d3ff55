"""The engine: forward hooks that run one method on one loaded model.

Three kinds of hook, all removable:
- a pre-hook on the top-level model reads `input_ids` at each call: at prefill it starts a `Request` (its token
  state and the plan of its cuts) and gives it to the call's KV cache; at decode it finds the request in the cache;
  either way it makes the request the active one of the thread for the length of the call;
- a pre-hook on the language model applies a cut made before it (the prompt itself gets shorter) and, at
  decode, keeps the padding mask in step with that shorter prompt;
- a pre-hook on every decoder layer applies a cut made at that layer and hands the layer the rotary
  embeddings and mask of the tokens alive there (`mmtoken.engine.slicing`).
Each layer's KV cache therefore holds exactly the tokens alive at that layer. Token counts are planned on the
CPU, so the hooks never make the CPU wait for the GPU (cuts whose scorer decides the count from the image, as
pooling's, ATP's, FEATHER's first and HoliTom's merge, are the exception).
"""

from __future__ import annotations

import time
from functools import partial
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from mmtoken.compat import cache_in, cache_of
from mmtoken.engine.cutting import cuts_at
from mmtoken.engine.evicting import evict_before_step
from mmtoken.engine.plan import Plan
from mmtoken.engine.pressing import press_cache
from mmtoken.engine.request import PrefillScratch, Request, activate, active, give_to, request_of
from mmtoken.engine.slicing import shortened_padding_mask, slice_decode, slice_prefill
from mmtoken.engine.streaming import StreamingPrefill, mask_chunk
from mmtoken.methods.base import ON_CACHE, CachePress, Method
from mmtoken.methods.h2o import H2O
from mmtoken.ops import gather_last
from mmtoken.state import CallState, TokenSet

if TYPE_CHECKING:
    from transformers import Cache

    from mmtoken.integrations.base import Adapter
    from mmtoken.integrations.vision import VisionWatch


class Recorder(Protocol):
    """Told what the engine measured: each finished prefill (with its seconds where timing is on) and the KV cache
    after each call."""

    def prefilled(self, call: CallState, seconds: float | None) -> None: ...

    def stepped(self, cache: Cache) -> None: ...


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _without_refed_tokens(request: Request, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A step's inputs without the tokens its cache already holds. After a cut before the language model the cache
    holds fewer entries than the tokens it has seen, so `generate()`, continuing from a cache it returned, counts
    the difference as unseen and feeds it again; the attention mask, which covers every token seen, tells how many
    tokens are new."""
    kwargs = dict(kwargs)
    if args:
        kwargs["input_ids"], args = args[0], args[1:]
    mask, fed = kwargs.get("attention_mask"), kwargs["input_ids"].shape[1]
    if mask is None:
        return args, kwargs
    new = mask.shape[1] - request.call.prompt_length - request.generated
    if not 0 < new <= fed:
        raise ValueError(f"mmtoken: the attention mask covers {mask.shape[1]} tokens, but the cache has seen "
                         f"{request.call.prompt_length + request.generated} and the step feeds {fed}")  # fmt: skip
    for name in ("input_ids", "position_ids", "cache_position"):
        if torch.is_tensor(kwargs.get(name)) and kwargs[name].shape[-1] == fed:
            kwargs[name] = kwargs[name][..., fed - new :]
    return args, kwargs


def _run(embeddings: torch.Tensor, row: int, start: int, end: int) -> list[torch.Tensor]:
    """The embeddings of tokens start:end of a row of the prompt's `embeddings`."""
    return [embeddings[row, start:end]]


class Engine:
    """Applies `method` to `model` through hooks. Requests own their state (`mmtoken.engine.request`); the engine
    holds only the hooks, the method and the vision `watch` (for methods that read the vision encoder's attention).
    With `timing`, each prefill is timed between two device synchronisations."""

    def __init__(
        self,
        model: nn.Module,
        adapter: Adapter,
        method: Method,
        recorder: Recorder,
        watch: VisionWatch | None = None,
        timing: bool = False,
    ) -> None:
        self.model, self.adapter, self.method, self.recorder = model, adapter, method, recorder
        self.watch, self.timing = watch, timing
        self.layers = adapter.decoder_layers
        self.depth = len(self.layers)
        self.steps = method.steps
        presses = [step for step in self.steps if isinstance(step, CachePress)]
        self.window = max((step.press.window for step in presses), default=0)
        streaming = [step for step in presses if step.chunk_frames is not None]
        evicting = [step for step in self.steps if isinstance(step, H2O)]
        self.evicting = evicting[-1] if evicting else None
        if streaming and (len(streaming) > 1 or any(step.stage != ON_CACHE for step in self.steps)):
            raise ValueError("a streaming prefill (chunk_frames) runs the prompt in chunks, so it takes one press "
                             "and no token method, whose cuts need the whole prompt at once")  # fmt: skip
        self.streaming = StreamingPrefill(model, adapter, streaming[0]) if streaming else None
        self.implementation = adapter.language_model.config._attn_implementation
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def attach(self) -> None:
        self._handles = [
            self.model.register_forward_pre_hook(self._on_call, with_kwargs=True),
            self.model.register_forward_hook(self._after_call, with_kwargs=True),
            self.model.register_forward_hook(self._release, always_call=True),
            self.adapter.language_model.register_forward_pre_hook(self._on_language_model, with_kwargs=True),
        ]
        for index, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_pre_hook(partial(self._on_layer, index), with_kwargs=True))
        if self.watch is not None:
            self.watch.attach()
        if self.streaming is not None:
            self.streaming.attach()

    def detach(self) -> None:
        if self.streaming is not None:
            self.streaming.detach()
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self.watch is not None:
            self.watch.detach()

    # top-level model

    def _on_call(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = cache_in(kwargs)
        if cache is not None and cache.get_seq_length() > 0:
            request = request_of(cache)
            if request is None or input_ids is None or input_ids.shape[0] != request.call.batch_size:
                raise RuntimeError("mmtoken: a decode step arrived without the prefill it continues")
            if request.shortened:
                args, kwargs = _without_refed_tokens(request, args, kwargs)
                input_ids = kwargs["input_ids"]
                if kwargs.get("position_ids") is None and request.next_position is not None:
                    kwargs["position_ids"] = request.positions_of_next(input_ids.shape[1])
            if request.step_masks is not None and input_ids.shape[1] != 1:
                raise ValueError(f"mmtoken: with cuda_graphs, a decode step takes one new token at a time, "
                                 f"not {input_ids.shape[1]}")  # fmt: skip
            request.advance(input_ids.shape[1])
            activate(request)
            return args, kwargs
        if input_ids is None:
            raise ValueError("mmtoken needs input_ids to find the visual tokens; inputs_embeds alone are not enough")
        call = self.adapter.call_state(input_ids, kwargs.get("attention_mask"), kwargs)
        if self.streaming is not None and call.padding.any():
            raise ValueError("a streaming prefill (chunk_frames) takes rows without padding: send rows of one length")
        plan = Plan(self.steps, self.depth)
        plan.extend(call.visual_counts, 0, 0, call.kinds.device)
        request = Request(call, PrefillScratch(plan))
        if cache is not None:
            give_to(cache, request)
        if self.timing:
            _synchronize(input_ids.device)
            request.started = time.perf_counter()
        activate(request)

    def _after_call(self, module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        request = active()  # `_release`, which runs after this hook (and where the call raised), lets it go
        cache = cache_of(output)
        if request.in_prefill:
            scratch, request.prefill = request.prefill, None
            seconds = None
            if self.timing:
                _synchronize(request.call.kinds.device)
                seconds = time.perf_counter() - request.started
            self.recorder.prefilled(request.call, seconds)
            if cache is not None:
                if request.records is None:  # a streaming prefill kept them chunk by chunk
                    request.record_layers(self.depth)
                if request_of(cache) is None:  # a cache the language model made itself
                    give_to(cache, request)
                press_cache(request, cache, scratch, self.layers, self.steps)
        if cache is not None:
            self.recorder.stepped(cache)

    @staticmethod
    def _release(module: nn.Module, args: tuple, output: object) -> None:
        """The call is over, also where it raised (out of memory, say): the thread serves no request, so the
        request's tensors (its prefill scratch, its cache) go with the call instead of staying until the next."""
        activate(None)

    # language model

    def _on_language_model(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        request = active()
        call = request.call
        if not request.in_prefill:
            if request.shortened:
                kwargs["attention_mask"] = shortened_padding_mask(request)
            return args, kwargs
        call.locate = partial(
            self.adapter.geometry, call, partial(_run, kwargs["inputs_embeds"]), kwargs.get("position_ids")
        )
        if self.watch is not None:
            call.vision_signal = self.watch.take(call)
        prompt = tokens = self._prompt_tokens(call)
        if 0 in request.prefill.plan.cuts:
            tokens, embeddings = cuts_at(request, 0, None, prompt, kwargs["inputs_embeds"], None)
        request.shortened = tokens is not prompt
        if request.shortened:
            tokens.slot = torch.arange(len(tokens), device=embeddings.device).expand(call.batch_size, -1)
            kwargs["inputs_embeds"] = embeddings
            kwargs["attention_mask"] = tokens.valid.long()
            position_ids = kwargs.get("position_ids")
            full = tokens.position if position_ids is None else gather_last(position_ids, tokens.position)
            kwargs["position_ids"] = full
        call.sets[0] = tokens
        positions = kwargs.get("position_ids")
        if positions is None:  # the model counts them from 0
            request.next_position = torch.full((call.batch_size, 1), call.prompt_length, device=call.kinds.device)
        else:
            request.next_position = positions.amax(-1, keepdim=True) + 1
        return args, kwargs

    @staticmethod
    def _prompt_tokens(call: CallState) -> TokenSet:
        """Every token of the prompt, as the language model receives it."""
        positions = torch.arange(call.prompt_length, device=call.kinds.device).expand(call.batch_size, -1)
        unpadded = all(t + v == call.prompt_length for t, v in zip(call.text_counts, call.visual_counts, strict=True))
        weight = torch.ones(positions.shape, device=positions.device)
        return TokenSet(positions, positions, ~call.padding, call.visual_counts, unpadded, weight)

    # decoder layers

    def _on_layer(self, index: int, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        request, hidden = active(), args[0]
        if request.in_prefill:
            if index > 0 and index in request.prefill.plan.cuts:
                alive = request.call.set_at(index)
                tokens, hidden = cuts_at(request, index, module, alive, hidden, kwargs)
                if tokens is not alive:
                    request.call.sets[index] = tokens
            if len(request.call.sets) > 1:  # else every layer so far sees what the model received
                slice_prefill(request, index, kwargs, self.implementation)
            elif request.records is not None:  # a streaming prefill's chunk after the first
                mask_chunk(request, index, hidden, kwargs, self.implementation)
            request.prefill.previous = (module, hidden, kwargs["position_embeddings"])
            if self.window:  # copies: a view would keep the layer's whole input alive until the press
                cos, sin = kwargs["position_embeddings"]
                request.prefill.windows[index] = (
                    hidden[:, -self.window :].clone(),
                    (cos[:, -self.window :].clone(), sin[:, -self.window :].clone()),
                )
        else:
            if self.evicting is not None and index > 0:
                evict_before_step(request, cache_in(kwargs), index, module, hidden, kwargs, self.evicting)
            slice_decode(request, index, hidden, kwargs, self.implementation)
        return (hidden, *args[1:]), kwargs
