"""The engine: forward hooks that run one method on one loaded model.

Three kinds of hook, all removable:
- a pre-hook on the top-level model reads `input_ids` at each call and, at prefill, starts a `CallState`;
- a pre-hook on the language model applies a cut made before it (the prompt itself gets shorter) and, at
  decode, keeps the padding mask in step with that shorter prompt;
- a pre-hook on every decoder layer applies a cut made at that layer and hands the layer the rotary
  embeddings and mask of the tokens alive there. Rotary phases are the original ones, sliced, never recomputed.
Each layer's KV cache therefore holds exactly the tokens alive at that layer. Token counts are planned on the
CPU, so the hooks never make the CPU wait for the GPU (cuts whose scorer decides the count from the image, as
pooling's, ATP's, FEATHER's first and HoliTom's merge, are the exception).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import nn

from mmtoken.accounting.stats import Stats, cache_bytes, measure_stats
from mmtoken.compat import cache_in, cache_of
from mmtoken.engine.masks import decode_mask, prefill_mask
from mmtoken.engine.select import select
from mmtoken.integrations.vision import VisionWatch
from mmtoken.methods.base import Method
from mmtoken.reducers import Reducer
from mmtoken.schedules import Cut
from mmtoken.scorers.base import ScoreInput, Scorer
from mmtoken.state import CallState, TokenSet

if TYPE_CHECKING:
    from mmtoken.integrations.base import Adapter


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _gather_last(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`tensor` gathered along its last dimension by `index` (batch, n), whatever its leading dimensions."""
    shape = [1] * (tensor.ndim - 2) + list(index.shape)
    return tensor.gather(-1, index.view(shape).expand(*tensor.shape[:-2], *index.shape))


def _gather_rows(table: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """Rows `slot` (batch, n) of a (batch or 1, length, dim) table."""
    table = table.expand(slot.shape[0], *table.shape[1:])
    return table.gather(1, slot[..., None].expand(-1, -1, table.shape[-1]))


@dataclass
class Resume:
    """Where planning goes on once a cut whose scorer decides the count is made: at step `step`, whose cuts come after
    layer `after`, from that cut's survivors less what the later cuts of its own step keep (`later`, per row)."""

    step: int
    after: int
    later: list[list[int]]

    def counts(self, survivors: list[int]) -> list[int]:
        for keep in self.later:
            survivors = [min(count, kept) for count, kept in zip(survivors, keep, strict=True)]
        return survivors


@dataclass
class PlannedCut:
    """One cut of one call: the visual tokens each row keeps (on the CPU and on the device), ranked by `scorer`
    and reduced by `reducer` (the cut's own, else its method's). `resume` is set on the last cut of a step whose
    scorer decides the count: the steps after it are planned once that cut is made."""

    scorer: Scorer
    reducer: Reducer
    keep: list[int]
    keep_on_device: torch.Tensor
    resume: Resume | None = None


def decides_count(scorer: Scorer) -> bool:
    return getattr(scorer, "discards", False)


class Engine:
    """Applies `method` to `model` through hooks; `stats` holds the numbers of the latest prefill.

    A method runs as one or more steps (`Method.steps`, several for a pipeline); each step's cuts come after the
    cuts of the step before and see its survivors."""

    def __init__(self, model: nn.Module, adapter: Adapter, method: Method) -> None:
        self.model, self.adapter, self.method = model, adapter, method
        self.layers = adapter.decoder_layers
        self.depth = len(self.layers)
        self.steps = method.steps
        self.watch = VisionWatch(adapter) if any(step.needs_vision for step in self.steps) else None
        self.implementation = adapter.language_model.config._attn_implementation
        self.call: CallState | None = None
        self._prefill = False
        self._keep: dict[int, list[PlannedCut]] = {}
        self._previous: tuple[nn.Module, torch.Tensor, tuple] | None = None
        self._sliced: dict[int, tuple[object, object, object]] = {}
        self._decode_masks: dict[int, tuple[object, object, int]] = {}
        self._started = 0.0
        self._measured: tuple[CallState, float] | None = None
        self._kv_bytes = 0
        self._stats: Stats | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    @property
    def stats(self) -> Stats | None:
        if self._measured is not None and self._stats is None:
            call, seconds = self._measured
            config = self.adapter.language_model.config
            self._stats = measure_stats(call, self.depth, config, seconds, self._kv_bytes)
        if self._stats is not None:
            self._stats.kv_bytes = self._kv_bytes
        return self._stats

    def alive_visual_tokens(self) -> dict[int, list[torch.Tensor]] | None:
        """Where the latest prefill's visual tokens were alive (see `CallState.visual_geometry`); None before one."""
        return None if self._measured is None else self._measured[0].visual_geometry()

    def attach(self) -> None:
        self._handles = [
            self.model.register_forward_pre_hook(self._on_call, with_kwargs=True),
            self.model.register_forward_hook(self._after_call, with_kwargs=True),
            self.adapter.language_model.register_forward_pre_hook(self._on_language_model, with_kwargs=True),
        ]
        for index, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_pre_hook(self._layer_hook(index), with_kwargs=True))
        if self.watch is not None:
            self.watch.attach()

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self.watch is not None:
            self.watch.detach()
        self.call = None

    # top-level model

    def _on_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = cache_in(kwargs)
        self._prefill = cache is None or cache.get_seq_length() == 0
        if not self._prefill:
            if self.call is None or input_ids is None or input_ids.shape[0] != self.call.batch_size:
                raise RuntimeError("mmtoken: a decode step arrived without the prefill it continues")
            return
        if input_ids is None:
            raise ValueError("mmtoken needs input_ids to find the visual tokens; inputs_embeds alone are not enough")
        call = self.adapter.call_state(input_ids, kwargs.get("attention_mask"), kwargs)
        self._keep = {}
        self._plan(call.visual_counts, 0, 0, call.kinds.device)
        self.call, self._previous, self._sliced, self._decode_masks = call, None, {}, {}
        _synchronize(input_ids.device)
        self._started = time.perf_counter()

    def _plan(self, counts: list[int], first: int, after: int, device: torch.device) -> None:
        """Visual tokens each row keeps at each cut of steps `first` on, from each step's schedule for the row's
        visual count, on the CPU and (copied before the model queues any work) on the model's device. A step
        whose scorer decides the count ends the planning: the steps after it are planned from its survivors, once
        its last cut that decides is made (and checked ahead where that cut is inside the language model)."""
        for index in range(first, len(self.steps)):
            step, planned, layers = self.steps[index], [], []
            for cut, keep in self._step_cuts(index, counts, after):
                scorer, reducer = cut.scorer or step.scorer, cut.reducer or step.reducer
                planned.append(PlannedCut(scorer, reducer, keep, torch.tensor(keep, device=device)))
                layers.append(cut.layer)
                self._keep.setdefault(cut.layer, []).append(planned[-1])
            after = layers[-1] if layers else after
            deciding = [position for position, cut in enumerate(planned) if decides_count(cut.scorer)]
            if deciding and index + 1 < len(self.steps):
                last = deciding[-1]
                planned[last].resume = Resume(index + 1, after, [cut.keep for cut in planned[last + 1 :]])
                if layers[last] > 0:
                    self._check_ahead(index + 1, counts, after, step.name, layers[last])
                return
            for cut in planned:
                counts = [min(count, kept) for count, kept in zip(counts, cut.keep, strict=True)]

    def _step_cuts(self, index: int, counts: list[int], after: int) -> list[tuple[Cut, list[int]]]:
        """The cuts of step `index` in layer order, each with the visual tokens each row keeps there, for rows of
        `counts` visual tokens; raises unless they come after layer `after`, the last cut of the step before.
        Rows of different counts may cut at different layers (a budget solved per count moves a curve's cuts):
        where a row makes no cut of its own it keeps all it has. A row without visual tokens has nothing to cut,
        nor a budget to meet."""
        step = self.steps[index]
        schedules = {
            count: {cut.layer: cut for cut in step.cuts(self.depth, count)} if count else {} for count in set(counts)
        }
        layers = sorted({layer for schedule in schedules.values() for layer in schedule})
        if layers and (layers[0] < after or 0 < layers[0] == after):
            raise ValueError(
                f"pipeline: step {index + 1} ({step.name}) cuts at layer {layers[0]}, not after the step before it "
                f"(its last cut is at layer {after})"
            )
        return [
            (
                next(schedule[layer] for schedule in schedules.values() if layer in schedule),
                [schedules[count][layer].keep if layer in schedules[count] else count for count in counts],
            )
            for layer in layers
        ]

    def _check_ahead(self, first: int, counts: list[int], after: int, decider: str, layer: int) -> None:
        """Raise now, before the language model runs, for the steps from `first` on: they are planned only at
        decoder layer `layer`, where `decider` decides how many visual tokens stay. So none may have a budget (what
        it starts from is unknown until then), and their cuts must come after the step before's, which is checked
        for `counts`, the most they can start from."""
        for index in range(first, len(self.steps)):
            step = self.steps[index]
            if getattr(step, "budget", None) is not None:
                raise ValueError(
                    f"pipeline: step {index + 1} ({step.name}) has a budget, but the visual tokens it starts from are "
                    f"only known at layer {layer}, inside the language model, where {decider} decides how many stay: "
                    "give it a ratio or a schedule instead"
                )
            cuts = self._step_cuts(index, counts, after)
            after = cuts[-1][0].layer if cuts else after

    def _after_call(self, module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        if self._prefill:
            _synchronize(self.call.kinds.device)
            self._measured, self._stats = (self.call, time.perf_counter() - self._started), None
        cache = cache_of(output)
        if cache is not None:
            self._kv_bytes = cache_bytes(cache)

    # language model

    def _on_language_model(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        call = self.call
        if not self._prefill:
            if 0 in self._keep:
                kwargs["attention_mask"] = self._shortened_padding_mask(kwargs)
            return args, kwargs
        call.locate = partial(self.adapter.geometry, call, kwargs["inputs_embeds"], kwargs.get("position_ids"))
        if self.watch is not None:
            call.vision_signal = self.watch.take(call)
        positions = torch.arange(call.prompt_length, device=call.kinds.device).expand(call.batch_size, -1)
        unpadded = all(t + v == call.prompt_length for t, v in zip(call.text_counts, call.visual_counts, strict=True))
        weight = torch.ones(positions.shape, device=positions.device)
        tokens = TokenSet(positions, positions, ~call.padding, call.visual_counts, unpadded, weight)
        if 0 in self._keep:
            tokens, embeddings = self._cuts_at(0, tokens, kwargs["inputs_embeds"], None)
            tokens.slot = torch.arange(len(tokens), device=embeddings.device).expand(call.batch_size, -1)
            kwargs["inputs_embeds"] = embeddings
            kwargs["attention_mask"] = tokens.valid.long()
            position_ids = kwargs.get("position_ids")
            kwargs["position_ids"] = _gather_last(positions if position_ids is None else position_ids, tokens.position)
        call.sets[0] = tokens
        return args, kwargs

    def _shortened_padding_mask(self, kwargs: dict) -> torch.Tensor:
        """At decode, the 2-D padding mask over the shortened prompt plus the tokens generated since."""
        call, prompt = self.call, self.call.sets[0]
        generated = cache_in(kwargs).get_seq_length() - len(prompt) + kwargs["inputs_embeds"].shape[1]
        mask = torch.cat([prompt.valid, prompt.valid.new_ones(call.batch_size, generated)], dim=1)
        given = kwargs.get("attention_mask")
        if given is None:
            return mask.long()
        tail = torch.arange(call.prompt_length, given.shape[1], device=given.device).expand(call.batch_size, -1)
        return given.gather(1, torch.cat([prompt.position, tail], dim=1)) * mask

    # decoder layers

    def _layer_hook(self, index: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            hidden = args[0]
            if self._prefill:
                if index in self._keep and index > 0:
                    tokens, hidden = self._cuts_at(index, self.call.set_at(index), hidden, kwargs)
                    self.call.sets[index] = tokens
                self._slice_prefill(index, kwargs)
                self._previous = (module, hidden, kwargs["position_embeddings"])
            else:
                self._slice_decode(index, hidden, kwargs)
            return (hidden, *args[1:]), kwargs

        return hook

    def _slice_prefill(self, index: int, kwargs: dict) -> None:
        start = self.call.stretch_of(index)
        if start == 0:
            return
        tokens = self.call.sets[start]
        mask = kwargs.get("attention_mask")
        cached = self._sliced.get(start)
        if cached is None or cached[0] is not mask:
            cos, sin = kwargs["position_embeddings"]
            sliced_mask = prefill_mask(mask, tokens.slot, tokens.valid, tokens.complete, self.implementation, cos.dtype)
            cached = (mask, sliced_mask, (_gather_rows(cos, tokens.slot), _gather_rows(sin, tokens.slot)))
            self._sliced[start] = cached
        kwargs["attention_mask"], kwargs["position_embeddings"] = cached[1], cached[2]
        kwargs["position_ids"] = None

    def _slice_decode(self, index: int, hidden: torch.Tensor, kwargs: dict) -> None:
        """At decode, the layer's mask over its own prompt tokens; computed once per stretch and step."""
        start = self.call.stretch_of(index)
        if start == 0:
            return
        tokens = self.call.sets[start]
        mask = kwargs.get("attention_mask")
        generated = cache_in(kwargs).layers[index].get_seq_length() - len(tokens) + hidden.shape[1]
        cached = self._decode_masks.get(start)
        if cached is None or cached[0] is not mask or cached[2] != generated:
            sliced = decode_mask(
                mask, tokens.slot, tokens.valid, tokens.complete, generated, hidden.shape[1], self.implementation,
                hidden.dtype,
            )  # fmt: skip
            cached = (mask, sliced, generated)
            self._decode_masks[start] = cached
        kwargs["attention_mask"] = cached[1]

    # cutting

    def _cuts_at(
        self, layer: int, tokens: TokenSet, hidden: torch.Tensor, kwargs: dict | None
    ) -> tuple[TokenSet, torch.Tensor]:
        """Make the cuts planned at `layer` one after the other (more than one only where pipeline steps meet)."""
        done = 0
        while done < len(self._keep[layer]):
            planned = self._keep[layer][done]
            tokens, hidden = self._cut(planned, layer, tokens, hidden, kwargs)
            resume = planned.resume
            if resume is not None:
                self._plan(resume.counts(tokens.visual_counts), resume.step, resume.after, hidden.device)
            done += 1
        return tokens, hidden

    def _cut(
        self, planned: PlannedCut, layer: int, tokens: TokenSet, hidden: torch.Tensor, kwargs: dict | None
    ) -> tuple[TokenSet, torch.Tensor]:
        """Score the visual tokens of `tokens` and keep the planned number of each row."""
        call, scorer = self.call, planned.scorer
        kept = [min(count, alive) for count, alive in zip(planned.keep, tokens.visual_counts, strict=True)]
        inputs = ScoreInput(
            hidden=hidden,
            layer=None,
            position_embeddings=None,
            candidates=call.visual(tokens),
            valid=tokens.valid,
            locate=lambda: call.geometry_of(tokens),
            kinds=call.kinds.gather(1, tokens.position),
            weight=tokens.weight,
            keep=kept,
            measure=lambda: call.vision_signal.gather(1, tokens.position),
        )
        if scorer.layer_offset == 0:
            cos, sin = kwargs["position_embeddings"]
            inputs.layer = self.layers[layer]
            inputs.position_embeddings = (_gather_rows(cos, tokens.slot), _gather_rows(sin, tokens.slot))
        elif scorer.layer_offset == -1:
            inputs.layer, inputs.hidden, inputs.position_embeddings = self._previous
        sizes = [text + visual for text, visual in zip(call.text_counts, kept, strict=True)]
        counted = not decides_count(scorer)
        local, valid = select(scorer.score(inputs), inputs.candidates, tokens.valid, planned.keep_on_device,
                              max(sizes) if counted else None)  # fmt: skip
        survivors = TokenSet(tokens.position.gather(1, local), tokens.slot.gather(1, local), valid, kept, False)
        if not counted:
            survivors.visual_counts = call.visual(survivors).sum(1).tolist()
            sizes = [text + visual for text, visual in zip(call.text_counts, survivors.visual_counts, strict=True)]
        survivors.complete = min(sizes) == len(survivors)
        inputs.hidden = hidden
        hidden, survivors.weight = planned.reducer.reduce(hidden, local, valid, inputs)
        return survivors, hidden
