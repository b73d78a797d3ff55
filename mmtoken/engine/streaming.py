"""Streaming chunked prefill: a video's prompt prefilled a few frames at a time, each chunk attending to the
pressed cache of the chunks before it, which is pressed again after every chunk. So no decoder layer ever holds
more than the press's `capacity` of visual entries plus one chunk and the text, however long the video.

The model's forward runs once: it encodes the images, and its language model gets no prompt embeddings, which would
hold a hidden state per token of the whole video (and, on transformers 5.17, a second copy of the video's features
with its newline): each chunk is embedded from the prompt's ids and the media's features as it enters
(`mmtoken.engine.embedding`), its video frames encoded just then (`Adapter.video_runs`), so neither the vision tower
nor the prompt ever holds the whole video's features; `generate` is kept from encoding them ahead. The language
model's forward is then run once per chunk (the decoder layers' hooks see every chunk; the language model's own hook
saw the whole prompt, once), with the chunk's original positions, no mask (rows without padding, so the model's
causal mask over the pressed cache is the right one) and the request's cache. The cache's record of each layer grows
by the chunk's entries and shrinks at each press, as decode steps later read it. The first layer is pressed too; its
decode steps are masked by its record, as after a cut before the language model.

Under sdpa the chunks attend through `STREAMED_PREFILL`: the model builds no causal mask, and a chunk's queries
attend causally aligned to the newest keys (flash attention, on the key/value heads themselves). The model's own
mask for the first layer, a chunk's queries over every token so far, would cost more than the prompt's embeddings:
itself, sdpa's float copy of it, and the first layer's keys and values repeated to every query head (transformers
repeats them wherever sdpa is given a mask), 7 per key/value head on OneVision-7B.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.backends.cuda import SDPAParams, can_use_flash_attention
from torch.nn.attention.bias import causal_lower_right
from torch.nn.functional import scaled_dot_product_attention
from transformers import AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask

from mmtoken.compat import CACHE_NAMES, cache_in, generation_positions, with_cache
from mmtoken.engine.attending import attention_in
from mmtoken.engine.embedding import ChunkedPrompt
from mmtoken.engine.masks import decode_mask
from mmtoken.engine.pressing import press_layer
from mmtoken.engine.record import CacheRecord
from mmtoken.engine.request import Request, active, give_to
from mmtoken.methods.base import CachePress
from mmtoken.state import PIXELS, TEXT, VIDEO

if TYPE_CHECKING:
    from mmtoken.integrations.base import Adapter


def chunk_bounds(request: Request, frames_per_chunk: int) -> list[int]:
    """Where each chunk of the prompt ends: a chunk holds `frames_per_chunk` frames of the prompt's media (an image
    is one frame) and the text before them; the last one also holds the text after the last frame. Rows must share
    their layout."""
    call = request.call
    geometry, kinds = call.geometry.cpu(), call.kinds.cpu()
    if not all(
        torch.equal(geometry[row], geometry[0]) and torch.equal(kinds[row], kinds[0]) for row in range(len(kinds))
    ):
        raise ValueError("streaming prefill: every row must lay out its prompt alike (same media at the same places)")
    visual = (kinds[0] != TEXT).tolist()
    frames = list(zip(geometry[0, :, 0].tolist(), geometry[0, :, 1].tolist(), strict=True))
    bounds, seen, last = [], 0, None
    for position, (is_visual, frame) in enumerate(zip(visual, frames, strict=True)):
        if is_visual and frame != last:
            if seen and seen % frames_per_chunk == 0:
                bounds.append(position)
            seen, last = seen + 1, frame
    return [*bounds, call.prompt_length]


def mask_chunk(request: Request, index: int, hidden: torch.Tensor, kwargs: dict, implementation: str) -> None:
    """Hand decoder layer `index` the mask of the chunk `hidden` over its pressed cache: every entry of the chunks
    before, causal within the chunk. The first layer, which holds every entry, has the model's own."""
    held = request.records[index].entries_valid().shape[1]
    if held != request.records[0].entries_valid().shape[1]:
        chunk = hidden.shape[1]
        kwargs["attention_mask"] = decode_mask(None, held + chunk, chunk, implementation, hidden.dtype, hidden.device)


STREAMED_PREFILL = "mmtoken_streamed_prefill"


def streamed_mask(*args, mask_function=causal_mask_function, attention_mask=None, **kwargs) -> torch.Tensor | None:
    """No mask where the model's would be causal alone, without padding (`streamed_attention` aligns it to the
    newest keys); else sdpa's."""
    if mask_function is causal_mask_function and attention_mask is None and kwargs.get("local_size") is None:
        return None
    return sdpa_mask(*args, mask_function=mask_function, attention_mask=attention_mask, **kwargs)


def flash_runs(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout: float, grouped: bool) -> bool:
    """Whether sdpa's flash attention runs on these queries, keys and values (`grouped`: fewer key heads) under
    `causal_lower_right`. Asked as that bias asks, without `is_causal`: sdpa refuses flash for `is_causal` with
    fewer queries than keys, and the bias then runs flash's own causal, which is aligned to the last key."""
    return query.is_cuda and can_use_flash_attention(SDPAParams(query, key, value, None, dropout, False, grouped))


def streamed_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """sdpa, but where there is no mask and fewer queries than keys (a chunk after the first), the queries are the
    newest of the keys: causal aligned to the last key, by flash attention on the key/value heads, with no mask made
    and no head repeated; where flash attention cannot run, over the causal mask the model would have made."""
    queries, keys = query.shape[2], key.shape[2]
    if attention_mask is None and 1 < queries < keys and kwargs.get("sliding_window") is None:
        grouped = query.shape[1] != key.shape[1]
        if flash_runs(query, key, value, dropout, grouped):
            out = scaled_dot_product_attention(query, key, value, attn_mask=causal_lower_right(queries, keys),
                                               dropout_p=dropout, scale=scaling, enable_gqa=grouped)  # fmt: skip
            return out.transpose(1, 2).contiguous(), None
        attention_mask = torch.ones(queries, keys, dtype=torch.bool, device=query.device).tril(keys - queries)
        attention_mask = attention_mask[None, None]
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)


AttentionInterface.register(STREAMED_PREFILL, streamed_attention)
AttentionMaskInterface.register(STREAMED_PREFILL, streamed_mask)


class StreamingPrefill:
    """Runs the prefill of `adapter`'s language model chunk by chunk for a method whose press streams (`CachePress`
    with `chunk_frames`), pressing every layer after each chunk. The call of `model` that prefills encodes its
    images but embeds no prompt: each chunk is embedded from the prompt's ids and the media's features as it enters
    (`ChunkedPrompt`), its video frames encoded as it enters (unless the features came encoded)."""

    def __init__(self, model: nn.Module, adapter: Adapter, press: CachePress) -> None:
        self.model, self.adapter, self.press = model, adapter, press
        self.language_model, self.layers = adapter.language_model, adapter.decoder_layers
        self._inner: Callable[..., object] | None = None
        self._call: Callable[..., object] | None = None

    def attach(self) -> None:
        self._inner, self._call = self.language_model.forward, self.model.forward
        self.language_model.forward = self._forward
        # the model's own signature, which `generate` reads to check the arguments it is given, less
        # `mm_encoder_outputs`: `generate` then hands over the pixels instead of encoding every frame ahead
        # (transformers 5.24), and the frames are encoded as their chunks enter
        forward = functools.wraps(self._call)(partial(StreamingPrefill._model_forward, self))
        signature = inspect.signature(self._call)
        forward.__signature__ = signature.replace(
            parameters=[parameter for name, parameter in signature.parameters.items() if name != "mm_encoder_outputs"]
        )
        self.model.forward = forward

    def detach(self) -> None:
        del self.language_model.forward
        del self.model.forward

    def _model_forward(self, *args: object, **kwargs: object) -> object:
        """The model's forward; at a prefill, its images encoded, its video frames left to encode and the prompt to
        embed as the chunks enter: the model gets an embedding-sized view of nothing in its place, which it hands
        to the language model."""
        cache = cache_in(kwargs)
        if cache is not None and cache.get_seq_length() > 0:
            return self._call(*args, **kwargs)
        if args:
            if len(args) > 1:
                raise ValueError("a streaming prefill takes the model's inputs by keyword (input_ids may come first)")
            kwargs["input_ids"] = args[0]
        request, ids = active(), kwargs.pop("input_ids")
        if kwargs.get("position_ids") is None:  # the model would compute them from the ids (M-RoPE), as generate does
            kwargs["position_ids"] = generation_positions(self.model, {"input_ids": ids, **kwargs})
        kinds = request.call.kinds.cpu()
        runs = self.adapter.video_runs(kwargs, self.press.chunk_frames)  # encoded as the chunks read them
        media = kwargs if runs is None else {name: value for name, value in kwargs.items() if name != PIXELS[VIDEO]}
        pieces = {
            kind: self.adapter.media_pieces(kind, output, int((kinds == kind).sum()))
            for kind, output in self.adapter.media_outputs(media).items()
        } | ({} if runs is None else {VIDEO: runs})
        for name in (*PIXELS.values(), "mm_encoder_outputs"):
            kwargs.pop(name, None)
        embed = self.model.get_input_embeddings()
        request.prefill.prompt = ChunkedPrompt(ids, kinds, pieces, embed)
        return self._call(inputs_embeds=embed.weight[None, :1].expand(*ids.shape, -1), **kwargs)

    def _forward(self, *args: object, **kwargs: object) -> object:
        request, cache = active(), cache_in(kwargs)
        if args or not request.in_prefill or (cache is not None and cache.get_seq_length() > 0):
            return self._inner(*args, **kwargs)
        if cache is None:  # the model would make its own; the chunks need one to share, which the caller gets back
            cache = DynamicCache(config=self.language_model.config)
            give_to(cache, request)
        kwargs.pop("inputs_embeds")
        prompt = request.prefill.prompt
        batch = len(prompt.ids)
        positions = kwargs.pop("position_ids")
        if positions.ndim == 2:
            positions = positions.expand(batch, -1)
        rest = {name: value for name, value in kwargs.items()
                if name not in (*CACHE_NAMES, "attention_mask", "cache_position")}  # fmt: skip
        empty = torch.zeros(batch, 0, dtype=torch.long, device=prompt.ids.device)
        request.records = [CacheRecord(empty, empty.bool(), True, 0) for _ in self.layers]  # each its own
        request.call.locate = partial(self.adapter.geometry, request.call, prompt.run, positions)
        bounds, start = chunk_bounds(request, self.press.chunk_frames), 0
        request.call.locate = None  # the geometry is read: the request, which outlives the prefill, lets go of `prompt`
        with attention_in(self.language_model.config, STREAMED_PREFILL):
            for end in bounds:
                embeds = prompt.embeddings(start, end)
                output = self._inner(inputs_embeds=embeds, position_ids=positions[..., start:end], attention_mask=None,
                                     **with_cache(cache), **rest)  # fmt: skip
                for record in request.records:
                    record.append(end - start)
                for index, layer in enumerate(self.layers):
                    window = request.prefill.windows.get(index)
                    press_layer(request, cache, index, layer, self.press, window)
                start = end
        return output
