"""Each request owns its token state: requests interleaved on one patched model, from one thread or several, give
exactly what each gives alone; a returned cache continues; a copy of a patched model works on its own."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from conftest import greedy, inputs, model_and_processor
from transformers.generation.streamers import BaseStreamer

import mmtoken
from mmtoken.compat import cache_of, with_cache
from mmtoken.engine.request import compact

# a cut before the language model (the prompt gets shorter), one inside it, and a pipeline of both
METHODS = {
    "pooling": {"stride": 2},
    "fastv": {"k": 2, "ratio": 0.4},
    "pdrop": {"layers": (2, 4), "ratio": 0.5},
    "pipeline": {"stages": ({"method": "pooling", "stride": 2}, {"method": "pdrop", "layers": (2, 4)})},
}
FAMILIES = ("llava", "qwen2_vl")
NEW_TOKENS = 4


class _Interleave(BaseStreamer):
    """Runs `between()` once, after the first decode step of the generation it streams."""

    def __init__(self, between) -> None:
        self.between, self.puts = between, 0

    def put(self, value: torch.Tensor) -> None:
        self.puts += 1
        if self.puts == 2:
            self.between()

    def end(self) -> None:
        pass


def _two_requests(family: str):
    return inputs(family, False, rows=[0]), inputs(family, False, rows=[1])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_prefill_between_the_decode_steps_of_another_request_changes_neither(family, method):
    model, _ = model_and_processor(family)
    first, second = _two_requests(family)
    with mmtoken.patched(model, method, **METHODS[method]):
        alone = [greedy(model, first, NEW_TOKENS), greedy(model, second, NEW_TOKENS)]
        interrupted = {}

        def run_second() -> None:
            interrupted["second"] = greedy(model, second, NEW_TOKENS)

        out = model.generate(**first, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                             streamer=_Interleave(run_second))  # fmt: skip
    assert torch.equal(out[:, first["input_ids"].shape[1] :], alone[0])
    assert torch.equal(interrupted["second"], alone[1])


@pytest.mark.parametrize("family", FAMILIES)
def test_two_threads_generating_on_one_patched_model_get_what_each_gets_alone(family):
    model, _ = model_and_processor(family)
    requests = _two_requests(family)
    with mmtoken.patched(model, "pipeline", **METHODS["pipeline"]):
        alone = [greedy(model, request, NEW_TOKENS) for request in requests]
        answers: dict[int, list[torch.Tensor]] = {0: [], 1: []}
        errors: list[BaseException] = []

        def run(index: int) -> None:
            try:
                for _ in range(10):
                    answers[index].append(greedy(model, requests[index], NEW_TOKENS))
            except BaseException as error:  # collected and re-raised in the main thread
                errors.append(error)

        threads = [threading.Thread(target=run, args=(index,)) for index in (0, 1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not errors, errors
    for index in (0, 1):
        assert len(answers[index]) == 10
        assert all(torch.equal(answer, alone[index]) for answer in answers[index])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_generate_continues_from_the_cache_it_returned(family, method):
    """After a cut before the language model the cache holds fewer entries than the prompt, and transformers feeds
    the difference again: the engine drops what the cache holds already."""
    model, _ = model_and_processor(family)
    batch = inputs(family, False, batch=2)
    settings = {"do_sample": False, "return_dict_in_generate": True}
    with mmtoken.patched(model, method, **METHODS[method]):
        whole = model.generate(**batch, max_new_tokens=4, min_new_tokens=4, **settings).sequences
        half = model.generate(**batch, max_new_tokens=2, min_new_tokens=2, **settings)
        mask = torch.cat([batch["attention_mask"], batch["attention_mask"].new_ones(2, 2)], dim=1)
        # as with the unpatched model, the media are in the cache already: only the tokens and the mask go again
        resumed = model.generate(input_ids=half.sequences, attention_mask=mask, **with_cache(cache_of(half)),
                                 max_new_tokens=2, min_new_tokens=2, **settings)  # fmt: skip
    assert torch.equal(resumed.sequences, whole)


@pytest.mark.parametrize(("method", "params"), [("pipeline", METHODS["pipeline"]), ("visionzip", {"ratio": 0.3})])
def test_a_copy_of_a_patched_model_runs_on_its_own(method, params):
    model, _ = model_and_processor("llava")
    batch = inputs("llava", False)
    with mmtoken.patched(model, method, **params) as handle:
        expected = greedy(model, batch, NEW_TOKENS)
        copied = copy.deepcopy(model)
        assert torch.equal(greedy(copied, batch, NEW_TOKENS), expected)
        assert copied._mmtoken_handle is not handle and copied._mmtoken_handle.stats is not None
        assert torch.equal(greedy(model, batch, NEW_TOKENS), expected)
    mmtoken.unpatch(copied)
    assert not any(layer._forward_pre_hooks for layer in copied.get_decoder().layers)


def _prefill_and_two_steps(model, batch, method: dict, compact_to=None) -> tuple[list[torch.Tensor], object]:
    """Prefill `batch` under `method` with a plain forward, optionally compact the last layer's cache to the entries
    `compact_to`, then decode two given tokens; the logits of the two steps, and the prefill's kept positions."""
    steps, mask = [], batch["attention_mask"]
    with mmtoken.patched(model, **method) as handle, torch.no_grad():
        out = model(**batch, use_cache=True)
        cache = cache_of(out)
        if compact_to is not None:
            compact(cache, 5, compact_to)
        token = torch.full((mask.shape[0], 1), 7)
        for _ in range(2):
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            out = model(input_ids=token, attention_mask=mask, use_cache=True, **with_cache(cache))
            steps.append(out.logits[:, -1])
        return steps, handle.latest_call.set_at(5).position


@pytest.mark.parametrize("rows", [1, 2])
def test_a_cache_compacted_by_hand_decodes_as_a_prefill_that_kept_the_same_tokens(rows):
    """A cut at the last layer keeps tokens whose keys and values equal a keep-all prefill's there (layers before it
    saw everything in both), so compacting a keep-all cache's last layer to them must decode the same. (A decode
    step by hand, as here, needs 1-D positions: LLaVA's.)"""
    model, _ = model_and_processor("llava")
    batch = inputs("llava", False, batch=rows)
    cut, kept = _prefill_and_two_steps(model, batch, {"method": "fastv", "k": 5, "keep": 6})
    compacted, _ = _prefill_and_two_steps(model, batch, {"method": "fastv", "k": 5, "ratio": 1.0}, compact_to=kept)
    for step_cut, step_compacted in zip(cut, compacted, strict=True):
        torch.testing.assert_close(step_compacted, step_cut, rtol=1e-5, atol=1e-5)


def test_compacting_needs_a_prefilled_request_and_a_layer_of_the_model():
    model, _ = model_and_processor("llava")
    batch = inputs("llava", False)
    with pytest.raises(ValueError, match="needs the KV cache of a request"), torch.no_grad():
        compact(cache_of(model(**batch, use_cache=True)), 3, torch.zeros(1, 2, dtype=torch.long))
    with mmtoken.patched(model, "fastv", k=2), torch.no_grad():
        cache = cache_of(model(**batch, use_cache=True))
        with pytest.raises(ValueError, match=r"layer must be in \[0, 6\), got 6"):
            compact(cache, 6, torch.zeros(1, 2, dtype=torch.long))


@pytest.mark.parametrize(
    ("family", "video", "method"),
    [
        ("llava", False, {"method": "visionzip", "ratio": 0.3}),
        ("qwen2_vl", False, {"method": "visionzip", "ratio": 0.3}),
        ("llava_onevision", True, {"method": "snapkv", "ratio": 0.3}),
        ("qwen2_vl", True, {"method": "snapkv", "capacity": 3, "chunk_frames": 1}),
    ],
    ids=["llava-cut-before", "qwen2_vl-cut-before", "onevision-press", "qwen2_vl-streamed-press"],
)
def test_a_decode_step_by_hand_after_a_shortened_first_layer_decodes_as_generate(family, video, method):
    """A first layer's cache shorter than the prompt (a cut before the language model, a press of every layer):
    a caller that gives no positions gets those `generate` gives, where the model would count them from that
    cache."""
    model, _ = model_and_processor(family)
    batch = inputs(family, video, rows=[0])
    with mmtoken.patched(model, **method), torch.no_grad():
        expected = model.generate(**batch, max_new_tokens=3, do_sample=False, output_logits=True,
                                  return_dict_in_generate=True)  # fmt: skip
        out = model(**batch, use_cache=True)
        cache, mask = cache_of(out), batch["attention_mask"]
        assert cache.layers[0].get_seq_length() < batch["input_ids"].shape[1]
        for step in range(2):
            token = expected.sequences[:, batch["input_ids"].shape[1] + step, None]
            mask = torch.cat([mask, mask.new_ones(1, 1)], 1)
            out = model(input_ids=token, attention_mask=mask, use_cache=True, **with_cache(cache))
            torch.testing.assert_close(out.logits[:, -1], expected.logits[step + 1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_decode_step_of_several_tokens_equals_them_one_by_one(rows, attention):
    """As speculative decoding feeds them: the new tokens see each other causally, in every layer's cache."""
    model, _ = model_and_processor("llava", attention)
    batch = inputs("llava", False, batch=rows)
    tokens = torch.tensor([[7, 9, 11]]).expand(rows, -1)
    logits = []
    for chunks in ([tokens], tokens.split(1, dim=1)):
        with mmtoken.patched(model, "fastv", k=2, ratio=0.4), torch.no_grad():
            mask, out = batch["attention_mask"], []
            cache = cache_of(model(**batch, use_cache=True))
            for chunk in chunks:
                mask = torch.cat([mask, mask.new_ones(rows, chunk.shape[1])], dim=1)
                out.append(model(input_ids=chunk, attention_mask=mask, use_cache=True, **with_cache(cache)).logits)
            logits.append(torch.cat(out, dim=1))
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["pooling", "pdrop"])
def test_one_token_decode_steps_reuse_their_masks_instead_of_allocating_them(method):
    """On a padded batch the masks of the language model (after a cut before it) and of a layer behind a cut are
    views of one buffer from step to step, not tensors the size of the prompt built at every step."""
    model, _ = model_and_processor("llava")
    batch = inputs("llava", False, batch=2)
    assert not batch["attention_mask"].all()
    layer = 5
    seen: dict[str, list[int]] = {"language model": [], "layer": []}

    def storage(name: str):
        def record(module, args, kwargs) -> None:
            hidden = args[0] if args else kwargs["inputs_embeds"]
            if hidden.shape[1] == 1:  # a decode step
                seen[name].append(kwargs["attention_mask"].untyped_storage().data_ptr())

        return record

    with mmtoken.patched(model, method, **METHODS[method]):
        hooks = [
            model.get_decoder().register_forward_pre_hook(storage("language model"), with_kwargs=True),
            model.get_decoder().layers[layer].register_forward_pre_hook(storage("layer"), with_kwargs=True),
        ]
        greedy(model, batch, 8)
        for hook in hooks:
            hook.remove()
    watched = "language model" if method == "pooling" else "layer"
    assert len(seen[watched]) == 7 and len(set(seen[watched])) == 1, seen[watched]
