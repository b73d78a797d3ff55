"""Decode steps over fixed caches (`mmtoken.graphs`), run eagerly on the CPU: the same buffers, counters and masks a
CUDA graph replays (graphed == eager is a GPU test), against the dynamic cache of the plain patch."""

from __future__ import annotations

import gc
import itertools

import pytest
import torch
from conftest import CASE_IDS, CASES, PRUNING, greedy_run, inputs, method_cases, model_and_processor
from transformers import DynamicCache

import mmtoken
from mmtoken.compat import cache_of, with_cache
from mmtoken.engine.request import compact, request_of
from mmtoken.graphs import prefill
from mmtoken.graphs.cache import CAPACITY_STEP, FixedCache, capacity_for
from mmtoken.graphs.decode import DecodeGraphs
from mmtoken.graphs.pooling import MatrixPooling
from mmtoken.graphs.prefill import PrefillGraphs
from mmtoken.graphs.segments import SegmentAttention, attend_segments
from mmtoken.graphs.vision import VisionGraphs
from mmtoken.integrations import adapter_for
from mmtoken.state import PIXELS
from mmtoken.zoo.tiny import tiny_model

METHODS = {
    "keep-all": {"method": "fastv", "k": 2, "ratio": 1.0},
    "fastv": {"method": "fastv", "k": 2, "ratio": 0.4},
    "pooling + pdrop": {"method": "pipeline",
                        "stages": ({"method": "pooling", "stride": 2}, {"method": "pdrop", "layers": (2, 4)})},
    "valuenorm": {"method": "valuenorm", "ratio": 0.5},  # a pressed cache, made fixed at its pressed sizes
}  # fmt: skip


def _fixed(model, handle) -> DecodeGraphs:
    graphs = DecodeGraphs(model, handle.engine.adapter.language_model, capture=False)
    graphs.attach()
    return graphs


@pytest.mark.parametrize(("family", "video"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_decode_over_fixed_caches_equals_the_dynamic_cache(family, video, method):
    """Batch of two padded rows, long enough that every cache outgrows its first capacity (room for at most
    2 * CAPACITY_STEP new tokens) and moves to a larger one."""
    model, _ = model_and_processor(family)
    batch = inputs(family, video, batch=2)
    new_tokens = 2 * CAPACITY_STEP + 1
    with mmtoken.patched(model, **METHODS[method]) as handle:
        tokens, logits = greedy_run(model, batch, new_tokens)
        graphs = _fixed(model, handle)
        fixed_tokens, fixed_logits = greedy_run(model, batch, new_tokens)
        graphs.detach()
    assert torch.equal(fixed_tokens, tokens)
    torch.testing.assert_close(fixed_logits, logits, rtol=1e-4, atol=1e-4)


def test_a_prefill_hands_back_a_fixed_cache_of_the_pruned_sizes_rounded_to_a_bucket():
    model, _ = model_and_processor("llava")
    batch = inputs("llava", False, batch=2)
    with mmtoken.patched(model, "fastv", k=2, ratio=0.4) as handle, torch.no_grad():
        dynamic = cache_of(model(**batch, use_cache=True))
        graphs = _fixed(model, handle)
        fixed = cache_of(model(**batch, use_cache=True))
        graphs.detach()
    assert isinstance(fixed, FixedCache)
    for layer, (dynamic_layer, fixed_layer) in enumerate(zip(dynamic.layers, fixed.layers, strict=True)):
        held = dynamic_layer.keys.shape[2]
        assert fixed_layer.get_seq_length() == held and int(fixed_layer.filled) == held
        assert fixed_layer.keys.shape[2] == capacity_for(held), layer
        torch.testing.assert_close(fixed_layer.keys[:, :, :held], dynamic_layer.keys)
    assert fixed.layers[0].keys.shape[2] > fixed.layers[-1].keys.shape[2]  # pruned layers hold less


def test_capacities_leave_room_and_round_up_to_the_bucket():
    assert capacity_for(0) == 2 * CAPACITY_STEP
    assert capacity_for(CAPACITY_STEP - 1) == 2 * CAPACITY_STEP
    assert capacity_for(CAPACITY_STEP) == 3 * CAPACITY_STEP
    assert all(capacity_for(n) - n > CAPACITY_STEP for n in range(300))


def test_buffers_go_back_to_the_pool_and_serve_the_next_request_of_that_size():
    model, _ = model_and_processor("llava")
    batch = inputs("llava", False, batch=2)
    with mmtoken.patched(model, "fastv", k=2, ratio=0.4) as handle, torch.no_grad():
        graphs = _fixed(model, handle)
        first = cache_of(model(**batch, use_cache=True))
        second = cache_of(model(**batch, use_cache=True))
        assert first.buffers is not second.buffers  # both alive: each has its own
        leased = {id(first.buffers), id(second.buffers)}
        del first, second
        gc.collect()
        third = cache_of(model(**batch, use_cache=True))
        graphs.detach()
    assert id(third.buffers) in leased


def test_a_fixed_cache_refuses_what_its_fixed_steps_cannot_follow():
    """Compacting a layer by hand and feeding more than one new token at a time both change sizes that a fixed
    cache's steps are captured for: each is refused with a clear error, before any work."""
    model, _ = model_and_processor("llava")
    batch = inputs("llava", False, batch=2)
    with mmtoken.patched(model, "fastv", k=2, ratio=0.4) as handle, torch.no_grad():
        graphs = _fixed(model, handle)
        out = model(**batch, use_cache=True)
        cache = cache_of(out)
        with pytest.raises(ValueError, match="fixed sizes"):
            compact(cache, 3, torch.zeros(2, 4, dtype=torch.long))
        two_tokens = batch["input_ids"][:, -2:]
        mask = torch.cat([batch["attention_mask"], torch.ones_like(two_tokens)], dim=1)
        with pytest.raises(ValueError, match="one new token at a time, not 2"):
            model(input_ids=two_tokens, attention_mask=mask, **with_cache(cache), use_cache=True)
        assert request_of(cache).generated == 0  # refused before the request counted the tokens
        graphs.detach()


PREFILL_METHODS = {
    **METHODS,
    "pdrop": {"method": "pdrop", "layers": (2, 4)},
    "visionzip": {"method": "visionzip", "ratio": 0.5},
    "pdrop + valuenorm": {"method": "pipeline",
                          "stages": ({"method": "pdrop", "layers": (2, 4)}, {"method": "valuenorm", "ratio": 0.5})},
}  # fmt: skip


def other_media(batch):
    """The same prompt with other pixels: every count the same, so the same prefill signature, other tokens kept."""
    return {key: value.flip(-1) if key in PIXELS.values() else value for key, value in batch.items()}


def _graphed_path(model, handle, prompts):
    """Greedy runs of `prompts` through the graphed prefill's path (run eagerly), and the signatures it added."""
    graphs = PrefillGraphs(handle.engine.adapter.language_model, handle.method, capture=False)
    known = set(graphs.signatures())  # of this model's other cases
    graphs.attach()
    try:
        runs = [greedy_run(model, prompt) for prompt in prompts]
    finally:
        graphs.detach()
    return runs, set(graphs.signatures()) - known


@pytest.mark.parametrize("rows", [[1], [0, 1]], ids=["one row", "padded rows"])
@pytest.mark.parametrize(("family", "video"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("method", sorted(PREFILL_METHODS))
def test_prefills_over_fixed_inputs_equal_the_plain_patch(family, video, method, rows):
    """The graphed prefill's path run eagerly: a signature's first prefill plain, then over the graph's fixed
    arguments and inputs with the results copied out, for other media of the same signature and back; generation
    (decode steps reading the copied token sets) must not change."""
    model, _ = model_and_processor(family)
    batch = inputs(family, video, rows=rows)
    prompts = [batch, other_media(batch), batch]
    with mmtoken.patched(model, **PREFILL_METHODS[method]) as handle:
        expected = [greedy_run(model, prompt) for prompt in prompts]
        runs, added = _graphed_path(model, handle, prompts)
    assert len(added) == 1
    assert not torch.equal(expected[1][1], expected[0][1])  # the other media change the answer's logits
    for (tokens, logits), (plain_tokens, plain_logits) in zip(runs, expected, strict=True):
        assert torch.equal(tokens, plain_tokens)
        torch.testing.assert_close(logits, plain_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("case", "method"), method_cases(PRUNING))
def test_questions_of_other_lengths_in_one_bucket_answer_as_the_plain_patch(case, method, monkeypatch):
    """Three questions of different lengths, padded up to one bucket, through the graphed prefill's path: each
    answer as the plain patch gives it, and at most one signature (none where a cut decides its count on the
    device, which prefills eagerly)."""
    family, video = case
    monkeypatch.setattr(prefill, "PROMPT_STEP", 512)  # past every tiny prompt: one bucket
    model, _ = model_and_processor(family)
    prompts = [inputs(family, video, rows=[1], question_lengths=[length]) for length in (4, 9, 6)]
    assert len({prompt["input_ids"].shape[1] for prompt in prompts}) == 3
    with mmtoken.patched(model, method, **PRUNING[method]) as handle:
        expected = [greedy_run(model, prompt) for prompt in prompts]
        runs, added = _graphed_path(model, handle, prompts)
    assert len(added) <= 1
    for (tokens, logits), (plain_tokens, plain_logits) in zip(runs, expected, strict=True):
        assert torch.equal(tokens, plain_tokens)
        torch.testing.assert_close(logits, plain_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("family", "video"), CASES, ids=CASE_IDS)
def test_padded_rows_of_other_lengths_share_their_buckets_signature(family, video, monkeypatch):
    """FastV's cut inside the language model over two padded rows whose questions change length: prompts of one
    bucket share one graph and answer as the plain patch; prompts past that bucket get a graph of their own (a
    signature is captured the second time it is seen)."""
    monkeypatch.setattr(prefill, "PROMPT_STEP", 256)
    model, _ = model_and_processor(family)
    lengths = [(4, 9), (7, 5), (4, 9), (4, 9 + 300), (5, 9 + 300)]  # the last two: 300 words more, a second bucket
    prompts = [inputs(family, video, rows=[0, 1], question_lengths=pair) for pair in lengths]
    buckets = [prefill.bucket(prompt["input_ids"].shape[1]) for prompt in prompts]
    assert buckets[0] == buckets[1] < buckets[3] == buckets[4]
    with mmtoken.patched(model, "fastv", k=2, ratio=0.4) as handle:
        expected = [greedy_run(model, prompt) for prompt in prompts]
        runs, added = _graphed_path(model, handle, prompts)
        graphs = PrefillGraphs(handle.engine.adapter.language_model, handle.method, capture=False)
        graphs.attach()
        try:  # what a graph holds fixed: the width of every layer's tokens
            widths = [_set_widths(model, prompt) for prompt in prompts[:2]]
        finally:
            graphs.detach()
    assert len(added) == 2
    assert widths[0] == widths[1] and len(widths[0]) == 2
    for (tokens, logits), (plain_tokens, plain_logits) in zip(runs, expected, strict=True):
        assert torch.equal(tokens, plain_tokens)
        torch.testing.assert_close(logits, plain_logits, rtol=1e-5, atol=1e-5)


def _set_widths(model, prompt) -> dict[int, int]:
    cache = DynamicCache(config=model.config.text_config)  # as generate gives it; without one, no graphs
    with torch.no_grad():
        model(**prompt, use_cache=True, **with_cache(cache))
    return {start: len(tokens) for start, tokens in request_of(cache).call.sets.items()}


def test_methods_patched_in_turn_keep_their_own_graphs(monkeypatch):
    """The least recently used graph goes when a method holds more than MAX_GRAPHS, never another method's: a
    benchmark that patches methods in turn replays each one's graphs."""
    monkeypatch.setattr(prefill, "MAX_GRAPHS", 1)
    model, _ = tiny_model("llava")  # its own, so no other test's graphs
    prompts = [inputs("llava", False, rows=[1], question_lengths=[length]) for length in (4, 4 + 40)]
    assert prefill.bucket(prompts[0]["input_ids"].shape[1]) < prefill.bucket(prompts[1]["input_ids"].shape[1])
    kept = {}
    for ratio in (0.4, 0.6, 0.4, 0.6):
        with mmtoken.patched(model, "fastv", k=2, ratio=ratio) as handle:
            graphs = PrefillGraphs(handle.engine.adapter.language_model, handle.method, capture=False)
            graphs.attach()
            try:
                for prompt in (prompts[0], prompts[0], prompts[1], prompts[1]):
                    greedy_run(model, prompt, new_tokens=1)
            finally:
                graphs.detach()
            kept[ratio] = graphs
    assert [len(graphs.signatures()) for graphs in kept.values()] == [1, 1]  # each its graph of the second bucket


def test_buckets_round_up_to_the_step():
    step = prefill.PROMPT_STEP
    assert [prefill.bucket(n) for n in (1, step, step + 1, 3 * step - 1)] == [step, step, 2 * step, 3 * step]


def test_a_prefill_of_many_tokens_stays_eager(monkeypatch):
    """Prefills bound by arithmetic ran slower from a graph: above GRAPHED_TOKENS per layer (as planned, all rows
    together) none is captured. Keep-all holds every token in every layer; FastV at 0.1 a tenth of the images."""
    model, _ = tiny_model("llava")  # its own, so no other test's graphs
    batch = inputs("llava", False, rows=[0, 1])
    monkeypatch.setattr(prefill, "GRAPHED_TOKENS", 100)  # between FastV's mean of 77 and keep-all's 154
    captured = {}
    for name, ratio in (("keep-all", 1.0), ("fastv", 0.1)):
        with mmtoken.patched(model, "fastv", k=2, ratio=ratio) as handle:
            graphs = PrefillGraphs(handle.engine.adapter.language_model, handle.method, capture=False)
            graphs.attach()
            try:
                for _ in range(3):
                    greedy_run(model, batch, new_tokens=1)
            finally:
                graphs.detach()
            captured[name] = len(graphs.signatures())
    assert captured == {"keep-all": 0, "fastv": 1}


def test_a_press_that_reads_the_prompts_last_queries_prefills_eagerly():
    """SnapKV's queries come from the layer hooks, which a replayed graph does not run."""
    model, _ = tiny_model("qwen2_vl")  # its own, so no other test's graphs
    batch = inputs("qwen2_vl", False, rows=[0, 1])
    with mmtoken.patched(model, "snapkv", ratio=0.5) as handle:
        expected = greedy_run(model, batch)
        graphs = PrefillGraphs(handle.engine.adapter.language_model, handle.method, capture=False)
        graphs.attach()
        try:
            runs = [greedy_run(model, batch) for _ in range(3)]
        finally:
            graphs.detach()
    assert graphs.signatures() == []
    for tokens, logits in runs:
        assert torch.equal(tokens, expected[0]) and torch.equal(logits, expected[1])


TOWER_CASES = [(family, video) for family, video in CASES if adapter_for(model_and_processor(family)[0]).pixel_tower]


@pytest.mark.parametrize(
    ("family", "video"), TOWER_CASES, ids=[f"{f}-{'video' if v else 'image'}" for f, v in TOWER_CASES]
)
def test_a_vision_tower_handing_back_only_what_the_model_reads_generates_the_same(family, video):
    """The graphed tower's outputs, run eagerly: copies of the states the model reads and None for the other hidden
    states. Generation must not change, so the model reads nothing that is left out."""
    model, _ = model_and_processor(family)
    batch = inputs(family, video, batch=2)
    tower, read = adapter_for(model).pixel_tower
    with mmtoken.patched(model, "fastv", k=2, ratio=0.4):
        tokens, logits = greedy_run(model, batch)
        graphs = VisionGraphs(tower, read, capture=False)
        graphs.attach()
        outputs = []
        handle = tower.register_forward_hook(lambda module, args, output: outputs.append(output))
        graphed_tokens, graphed_logits = greedy_run(model, batch)
        handle.remove()
        graphs.detach()
    assert torch.equal(graphed_tokens, tokens)
    torch.testing.assert_close(graphed_logits, logits, rtol=0, atol=0)
    states = outputs[0].hidden_states or ()  # Qwen's ViT hands back none: the model reads its merged tokens only
    assert [i for i, state in enumerate(states) if state is not None] == sorted(i % len(states) for i in read)


def test_cuda_graphs_need_a_cuda_device():
    model, _ = model_and_processor("llava")
    with pytest.raises(ValueError, match="cuda_graphs needs a model on a CUDA device"):
        mmtoken.patch(model, "fastv", k=2, cuda_graphs=True)
    assert not hasattr(model, "_mmtoken_handle")


@pytest.mark.parametrize("side", [27, 6, 5])
def test_matrix_pooling_equals_transformers_bilinear_pooling(side):
    model, _ = tiny_model("llava_onevision")
    base = model.model
    vision = base.config.vision_config
    pooling = MatrixPooling(base)
    pooling.side = side  # the tiny tower's grid is small; the production one is 27 x 27
    features = torch.randn(3, side * side, 40)
    vision.image_size, saved = side * vision.patch_size, vision.image_size
    try:
        expected = type(base).apply_pooling(base, features)
    finally:
        vision.image_size = saved
    torch.testing.assert_close(pooling.pool(features), expected, rtol=1e-5, atol=1e-6)


def test_matrix_pooling_serves_the_models_video_features_while_attached():
    model, _ = tiny_model("llava_onevision")
    batch = inputs("llava_onevision", video=True)
    with torch.no_grad():
        expected = model.model.get_video_features(batch["pixel_values_videos"]).pooler_output
        pooling = MatrixPooling(adapter_for(model).frame_pooling)
        pooling.attach()
        try:
            assert model.model.apply_pooling == pooling.pool
            pooled = model.model.get_video_features(batch["pixel_values_videos"]).pooler_output
        finally:
            pooling.detach()
    torch.testing.assert_close(pooled, expected, rtol=1e-5, atol=1e-6)
    assert "apply_pooling" not in vars(model.model)


@pytest.mark.parametrize("lengths", [(5, 5, 5), (3, 7, 1, 4)], ids=["equal", "unequal"])
def test_attention_over_all_segments_at_once_equals_one_attention_per_segment(lengths):
    heads, dim = 3, 8
    query, key, value = (torch.randn(heads, sum(lengths), dim) for _ in range(3))
    bounds = torch.tensor([0, *lengths]).cumsum(0)
    expected = torch.cat([torch.nn.functional.scaled_dot_product_attention(query[:, a:b], key[:, a:b], value[:, a:b])
                          for a, b in itertools.pairwise(bounds.tolist())], dim=1).transpose(0, 1)  # fmt: skip
    out = attend_segments(query, key, value, bounds, max(lengths), dim**-0.5)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("video", [False, True], ids=["images of two sizes", "video"])
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_vit_attending_all_segments_at_once_encodes_as_transformers(family, video, monkeypatch):
    """Frames of two sizes (unequal segments, padded) and of one (equal ones, a view); Qwen2.5-VL's windows too.
    Each block makes one attention call, where transformers makes one per segment."""
    model, _ = model_and_processor(family)
    batch = inputs(family, video, batch=2)
    pixels, grid = (batch["pixel_values_videos"], batch["video_grid_thw"]) if video else (
        batch["pixel_values"], batch["image_grid_thw"])  # fmt: skip
    tower = adapter_for(model).segmented_tower
    segments, implementation = SegmentAttention(tower), tower.config._attn_implementation
    calls, attention = [], torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *args, **kwargs: calls.append(1) or attention(*args, **kwargs))  # fmt: skip
    with torch.no_grad():
        expected = tower(pixels, grid_thw=grid).pooler_output
        per_segment, calls[:] = len(calls), []
        segments.attach()
        try:
            out = tower(pixels, grid_thw=grid).pooler_output
        finally:
            segments.detach()
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    assert len(calls) == len(tower.blocks) < per_segment
    assert tower.config._attn_implementation == implementation
