"""KV presses (`mmtoken.kv`, stage `on_cache`): the invariants of the token methods, held on the KV cache, and each
press's score against an explicit computation."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from conftest import CASE_IDS, CASES, PRESSES, examples, greedy_run, inputs, model_and_processor, unpatched

import mmtoken
from mmtoken.compat import cache_in
from mmtoken.engine import pressing
from mmtoken.kv import PressInput
from mmtoken.kv.bilevel import bilevel_groups, frame_chunks
from mmtoken.kv.shares import in_turns
from mmtoken.kv.snapkv import SnapKV
from mmtoken.kv.temporal import TemporalRedundancy
from mmtoken.kv.value_norm import ValueNorm
from mmtoken.methods import METHODS
from mmtoken.methods.base import CachePress
from mmtoken.state import TEXT

PRESS_CASES = [
    pytest.param(case, press, id=f"{case_id}-{press}")
    for press in PRESSES
    for case, case_id in zip(CASES, CASE_IDS, strict=True)
]


def _prefill_cache(model, batch):
    with torch.no_grad():
        return model(**batch, use_cache=True).past_key_values


@pytest.mark.parametrize(("case", "press"), PRESS_CASES)
def test_a_press_that_keeps_every_entry_equals_unpatched(case, press):
    family, video = case
    model, _ = model_and_processor(family)
    batch = inputs(family, video, batch=2)
    _, expected_tokens = unpatched(family, video)
    with torch.no_grad():
        _, expected_logits = greedy_run(model, batch)
        with mmtoken.patched(model, press, **examples(press).keep_all):
            tokens, logits = greedy_run(model, batch)
    assert torch.equal(tokens, expected_tokens)
    assert (logits - expected_logits).abs().max() < 1e-4


@pytest.mark.parametrize(("case", "press"), PRESS_CASES)
@pytest.mark.parametrize("share", [{"ratio": 0.4}, {"ratio": 0.4, "visual_only": False}, {"capacity": 3}],
                         ids=["visual", "all", "capacity"])  # fmt: skip
def test_a_pressed_padded_batch_equals_rows_alone(case, press, share):
    family, video = case
    model, _ = model_and_processor(family)
    batch = inputs(family, video, batch=2)
    rows = [inputs(family, video, rows=[row]) for row in range(2)]
    takes_a_share = issubclass(METHODS[press], CachePress) and press != "bilevel"  # bi-level keeps chunks, h2o evicts
    params = share if takes_a_share else examples(press).cutting
    with mmtoken.patched(model, press, **params), torch.no_grad():
        together, logits = greedy_run(model, batch)
        alone = [greedy_run(model, row) for row in rows]
    assert torch.equal(together, torch.cat([tokens for tokens, _ in alone]))
    assert (logits - torch.cat([row_logits for _, row_logits in alone])).abs().max() < 1e-4


@pytest.mark.parametrize(("case", "press"), PRESS_CASES)
def test_sdpa_equals_eager_when_pressed(case, press):
    family, video = case
    batch = inputs(family, video, batch=2)
    outputs = []
    for attention in ("sdpa", "eager"):
        model, _ = model_and_processor(family, attention)
        with mmtoken.patched(model, press, **examples(press).cutting), torch.no_grad():
            outputs.append(greedy_run(model, batch)[0])
    assert torch.equal(*outputs)


@pytest.mark.parametrize(("family", "video"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("press", ["snapkv", "valuenorm"])
def test_pressing_keeps_the_text_and_its_share_of_the_visual_entries_bit_for_bit(family, video, press):
    model, _ = model_and_processor(family)
    batch = inputs(family, video, rows=[0])
    full = _prefill_cache(model, batch)
    window = (
        {"window": 1} if press == "snapkv" else {}
    )  # the tiny prompts end in few text tokens; SnapKV keeps its window
    with mmtoken.patched(model, press, ratio=0.3, **window):
        pressed = _prefill_cache(model, batch)
    kinds = mmtoken.integrations.adapter_for(model).call_state(batch["input_ids"], batch["attention_mask"], batch).kinds
    visual = int((kinds != TEXT).sum())
    text = kinds.shape[1] - visual
    for index in range(len(full.layers)):  # every layer, the first too
        keys, values = pressed.layers[index].keys[0], pressed.layers[index].values[0]
        assert keys.shape[1] == text + round(0.3 * visual)  # the memory of the others is gone, not masked:
        for held in (pressed.layers[index].keys, pressed.layers[index].values):  # no view into a full-size buffer
            assert held.untyped_storage().nbytes() == held.numel() * held.element_size()
        matches = (keys[:, :, None] == full.layers[index].keys[0][:, None]).all(-1).all(0)  # (kept, all)
        assert (matches.sum(1) == 1).all()
        kept = matches.int().argmax(1)
        assert torch.equal(kept, kept.sort().values)  # in their original order
        assert torch.isin((kinds[0] == TEXT).nonzero().flatten(), kept).all()  # every text entry stays
        assert torch.equal(values, full.layers[index].values[0][:, kept])


def test_pressing_after_pruning_in_a_pipeline_shrinks_the_cache_further():
    model, _ = model_and_processor("qwen2_vl")
    batch = inputs("qwen2_vl", True, batch=2)
    stages = ({"method": "pdrop", "layers": (2, 4), "ratio": 0.5}, {"method": "snapkv", "ratio": 0.5})
    with torch.no_grad():
        with mmtoken.patched(model, "pdrop", layers=(2, 4), ratio=0.5):
            pruned = _prefill_cache(model, batch)
        with mmtoken.patched(model, "pipeline", stages=stages):
            both = _prefill_cache(model, batch)
            tokens, _ = greedy_run(model, batch)
    for index in range(1, len(pruned.layers)):
        assert both.layers[index].keys.shape[2] < pruned.layers[index].keys.shape[2]
    assert tokens.shape == (2, 4)


def _explicit_snapkv(keys, queries, valid, scaling, kernel):
    batch, kv_heads, length, _ = keys.shape
    heads, window = queries.shape[1], queries.shape[2]
    keys = keys.repeat_interleave(heads // kv_heads, dim=1)
    total = torch.zeros(batch, length)
    for row in range(batch):
        for head in range(heads):
            for step in range(window):
                at = length - window + step
                logits = (keys[row, head, : at + 1] @ queries[row, head, step]) * scaling
                logits = logits.masked_fill(~valid[row, : at + 1], float("-inf"))
                total[row, : at + 1] += logits.softmax(0) / (heads * window)
    padded = torch.nn.functional.pad(total, (kernel // 2, kernel // 2), value=float("-inf"))
    pooled = padded.unfold(1, kernel, 1).amax(-1)
    pooled[:, length - window :] = float("inf")
    return pooled


def test_snapkv_scores_are_the_windows_attention_pooled_over_neighbours():
    generator = torch.Generator().manual_seed(0)
    keys, values = torch.randn(2, 2, 20, 8, generator=generator), torch.randn(2, 2, 20, 8, generator=generator)
    queries = torch.randn(2, 4, 3, 8, generator=generator)
    valid = torch.ones(2, 20, dtype=torch.bool)
    valid[1, :4] = False  # left padding
    inputs_ = PressInput(keys, values, valid, valid.clone(), queries, 0.3)
    expected = _explicit_snapkv(keys, queries, valid, 0.3, 5)
    torch.testing.assert_close(SnapKV(window=3, kernel=5).score(inputs_), expected)


def test_value_norm_scores_each_entrys_value_norm_over_heads():
    values = torch.randn(1, 3, 6, 4)
    inputs_ = PressInput(
        torch.zeros_like(values), values, torch.ones(1, 6, dtype=torch.bool), torch.ones(1, 6, dtype=torch.bool)
    )
    torch.testing.assert_close(ValueNorm().score(inputs_), values.norm(dim=-1).mean(1))


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"method": "snapkv", "ratio": 0.0}, "share of the KV entries that stay"),
        ({"method": "valuenorm", "ratio": 1.5}, "share of the KV entries that stay"),
        ({"method": "snapkv", "window": 0}, "window must be >= 1"),
        ({"method": "snapkv", "kernel": 4}, "kernel must be an odd number"),
        ({"method": "bilevel", "ratio": 0.5}, "keeps whole chunks of a video"),
        ({"method": "bilevel", "pool": -1}, "top and pool >= 0"),
        (
            {"method": "pipeline", "stages": ({"method": "pooling"}, {"method": "snapkv"}), "budget": 64},
            "keeps a share of the KV cache",
        ),
    ],
)
def test_a_press_that_cannot_meet_its_parameters_is_refused_before_any_work(params, message):
    model, _ = model_and_processor("llava")
    with pytest.raises(ValueError, match=message):
        mmtoken.patch(model, params)
    assert not model._forward_pre_hooks


def test_temporal_redundancy_scores_the_distance_to_the_latest_frame_at_the_same_place():
    generator = torch.Generator().manual_seed(1)
    latest = torch.randn(1, 2, 4, 8, generator=generator)  # frame 1: 2 x 2 places, two key-value heads
    earlier = latest.clone()
    earlier[:, :, 2:] = torch.randn(1, 2, 2, 8, generator=generator)  # frame 0 repeats the first row only
    keys = torch.cat([torch.randn(1, 2, 1, 8, generator=generator), earlier, latest], dim=2)  # text, frame 0, 1
    places = [(frame, row, column) for frame in range(2) for row in range(2) for column in range(2)]
    geometry = torch.tensor([[[-1, -1, -1, -1]] + [[0, *place] for place in places]])
    visual = geometry[..., 0] >= 0
    inputs_ = PressInput(keys, keys, torch.ones_like(visual), visual, geometry=geometry)
    scores = TemporalRedundancy().score(inputs_)[0]
    unit = torch.nn.functional.normalize(keys[0], dim=-1)
    expected = 1 - (unit[:, 1:5] * unit[:, 5:9]).sum(-1).mean(0)
    torch.testing.assert_close(scores[1:5], expected)
    assert scores[1:3].abs().max() < 1e-6 and (scores[3:5] > 0.1).all()  # repeated places score 0
    assert (scores[5:] == 3.0).all()  # the latest frame stays first


STREAMING_FAMILIES = [family for family, video in CASES if video]


def _twice(batch):
    """The batch's one row twice: two rows of one layout, as a streaming prefill takes them."""
    return {key: torch.cat([value, value]) if torch.is_tensor(value) else value for key, value in batch.items()}


@pytest.mark.parametrize("family", STREAMING_FAMILIES)
def test_a_streaming_prefill_with_room_for_every_entry_equals_unpatched(family):
    model, _ = model_and_processor(family)
    batch = inputs(family, True, rows=[0])
    with torch.no_grad():
        expected_tokens, expected_logits = greedy_run(model, batch)
        with mmtoken.patched(model, "valuenorm", capacity=10**6, chunk_frames=1):
            tokens, logits = greedy_run(model, batch)
    assert torch.equal(tokens, expected_tokens)
    assert (logits - expected_logits).abs().max() < 1e-4


@pytest.mark.parametrize("family", STREAMING_FAMILIES)
@pytest.mark.parametrize("press", ["snapkv", "valuenorm", "kvtemporal"])
def test_a_streaming_prefill_never_holds_more_than_its_capacity_and_one_chunk(family, press):
    model, _ = model_and_processor(family)
    batch = inputs(family, True, rows=[0])
    adapter = mmtoken.integrations.adapter_for(model)
    kinds = adapter.call_state(batch["input_ids"], batch["attention_mask"], batch).kinds
    text, capacity = int((kinds == TEXT).sum()), 3
    held = []

    def watch(index, module, args, kwargs):  # what the layer's cache holds as each chunk enters it
        layers = cache_in(kwargs).layers
        held.append(layers[index].get_seq_length() if len(layers) > index else 0)

    hooks = [layer.register_forward_pre_hook(partial(watch, index), with_kwargs=True)
             for index, layer in enumerate(adapter.decoder_layers)]  # fmt: skip
    try:
        with mmtoken.patched(model, press, capacity=capacity, chunk_frames=1), torch.no_grad():
            cache = model(**batch, use_cache=True).past_key_values
    finally:
        for hook in hooks:
            hook.remove()
    assert len(held) >= 2 * len(hooks)  # each layer once per chunk: the prompt went in several (Qwen pairs 4 frames)
    # before each chunk, in every layer, the first too: the text so far and the capacity, never the video
    assert max(held) <= text + capacity
    assert all(layer.get_seq_length() <= text + capacity for layer in cache.layers)


def test_in_turns_takes_the_best_of_every_group_before_the_second_best_of_any():
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0, 9.0, float("inf")]])
    groups = torch.tensor([[0, 0, 0, 1, 1, -1, 1]])
    turns = in_turns(scores, groups)
    candidates = groups >= 0
    best = turns.masked_fill(~candidates, float("-inf")).topk(4).indices[0].tolist()
    assert best == [6, 0, 1, 3]  # the entry that must stay (its group's first), group 0's first, then both seconds
    assert scores.masked_fill(~candidates, float("-inf")).topk(4).indices[0].tolist() == [6, 0, 1, 2]


@pytest.mark.parametrize("family", STREAMING_FAMILIES)
def test_a_streamed_press_of_every_layer_decodes_at_the_positions_of_unpatched_decode_steps(family):
    model, _ = model_and_processor(family)
    batch = inputs(family, True, rows=[0])
    adapter = mmtoken.integrations.adapter_for(model)
    positions = []

    def watch(module, args, kwargs):  # the positions of each decode step's token, as the language model gets them
        cache = cache_in(kwargs)
        if cache is not None and cache.get_seq_length() > 0:
            positions.append(kwargs["position_ids"])

    hook = adapter.language_model.register_forward_pre_hook(watch, with_kwargs=True)
    try:
        with torch.no_grad():
            greedy_run(model, batch)
            expected, positions = positions, []
            with mmtoken.patched(model, "snapkv", capacity=3, chunk_frames=1):
                _, logits = greedy_run(model, batch)
                cache = model(**batch, use_cache=True).past_key_values
    finally:
        hook.remove()
    prompt = batch["input_ids"].shape[1]
    assert cache.layers[0].get_seq_length() < prompt // 2  # the first layer was pressed too
    assert len(positions) == len(expected) == 3 and all(map(torch.equal, positions, expected))
    assert logits.isfinite().all()


@pytest.mark.parametrize("family", STREAMING_FAMILIES)
def test_a_streamed_press_decodes_alike_under_sdpa_and_eager(family):
    batch = inputs(family, True, rows=[0])
    outputs = []
    for attention in ("sdpa", "eager"):
        model, _ = model_and_processor(family, attention)
        with mmtoken.patched(model, "snapkv", capacity=3, chunk_frames=1), torch.no_grad():
            outputs.append(greedy_run(model, batch))
    assert torch.equal(outputs[0][0], outputs[1][0])
    assert (outputs[0][1] - outputs[1][1]).abs().max() < 1e-4


@pytest.mark.parametrize("family", STREAMING_FAMILIES)
def test_a_streamed_press_with_chunk_shares_keeps_each_chunk_an_equal_share(family, monkeypatch):
    """SnapKV streamed a frame at a time, 8 entries a layer: after the last chunk, every layer keeps as many visual
    entries of each chunk (frame) as of any other, give or take one."""
    model, _ = model_and_processor(family)
    batch = inputs(family, True, rows=[0])
    presses = []
    score, choose = SnapKV.score, pressing.select

    def scored(self, press_input):  # what each press of a layer read
        presses.append({"input": press_input})
        return score(self, press_input)

    def chosen(*args):
        presses[-1]["local"], presses[-1]["kept"] = choose(*args)
        return presses[-1]["local"], presses[-1]["kept"]

    monkeypatch.setattr(SnapKV, "score", scored)
    monkeypatch.setattr(pressing, "select", chosen)
    with mmtoken.patched(model, "snapkv", capacity=8, chunk_frames=1, chunk_shares=True), torch.no_grad():
        model(**batch, use_cache=True)
    layers = len(mmtoken.integrations.adapter_for(model).decoder_layers) - 1
    for press in presses[-layers:]:  # the last chunk's presses, one per layer but the first
        chunk = frame_chunks(press["input"].geometry, press["input"].visual, 1)
        kept = chunk.gather(1, press["local"])[press["kept"]]
        counts = torch.bincount(kept[kept >= 0], minlength=int(chunk.max()) + 1)
        assert len(counts) > 1 and counts.sum() == 8 and counts.max() - counts.min() <= 1


@pytest.mark.parametrize("family", STREAMING_FAMILIES)
def test_a_streamed_batch_equals_its_rows_alone(family):
    model, _ = model_and_processor(family)
    row = inputs(family, True, rows=[0])
    with mmtoken.patched(model, "snapkv", capacity=4, chunk_frames=1), torch.no_grad():
        alone, alone_logits = greedy_run(model, row)
        together, logits = greedy_run(model, _twice(row))
    assert torch.equal(together, torch.cat([alone, alone]))
    assert (logits - torch.cat([alone_logits, alone_logits])).abs().max() < 1e-4


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"method": "valuenorm", "chunk_frames": 2}, "keeps a fixed capacity"),
        ({"method": "valuenorm", "capacity": 4, "ratio": 0.5}, "give one of ratio, capacity"),
        ({"method": "valuenorm", "capacity": 4, "chunk_frames": 0}, "chunk_frames must be >= 1"),
        ({"method": "snapkv", "capacity": 4, "chunk_shares": True}, "give chunk_frames"),
        ({"method": "pipeline", "stages": ({"method": "pdrop", "layers": (2, 4)},
                                           {"method": "snapkv", "capacity": 4, "chunk_frames": 1})},
         "takes one press and no token method"),
    ],
)  # fmt: skip
def test_a_streaming_prefill_that_cannot_run_is_refused_at_patch_time(params, message):
    model, _ = model_and_processor("qwen2_vl")
    with pytest.raises(ValueError, match=message):
        mmtoken.patch(model, params)
    assert not model._forward_pre_hooks


def test_a_streaming_prefill_takes_its_inputs_by_keyword_but_the_ids():
    model, _ = model_and_processor("qwen2_vl")
    batch = inputs("qwen2_vl", True, rows=[0])
    rest = {key: value for key, value in batch.items() if key != "input_ids"}
    with mmtoken.patched(model, "valuenorm", capacity=4, chunk_frames=1), torch.no_grad():
        expected = model(**batch).logits
        assert torch.equal(model(batch["input_ids"], **rest).logits, expected)
        with pytest.raises(ValueError, match="takes the model's inputs by keyword"):
            model(
                batch["input_ids"], batch["attention_mask"], **{k: v for k, v in rest.items() if k != "attention_mask"}
            )


def test_a_streaming_prefill_refuses_padded_rows_before_the_model_runs():
    model, _ = model_and_processor("qwen2_vl")
    batch = inputs("qwen2_vl", True, batch=2)
    with mmtoken.patched(model, "valuenorm", capacity=4, chunk_frames=1), pytest.raises(ValueError, match="padding"):
        model(**batch)
    with pytest.raises(ValueError, match="does not take a streaming prefill"):
        mmtoken.patch(model, "valuenorm", capacity=4, chunk_frames=1, cuda_graphs=True)


def test_a_demo_column_under_a_press_reports_the_smaller_cache():
    from mmtoken.demos.comparison import run_column  # the demo's own column, without its browser

    model, processor = model_and_processor("qwen2_vl")
    batch = inputs("qwen2_vl", True, rows=[0])
    keep_all = run_column(model, processor, batch, {"method": "snapkv", "ratio": 1.0}, 4)
    pressed = run_column(model, processor, batch, {"method": "snapkv", "ratio": 0.25}, 4)
    assert pressed["kv_bytes"] < keep_all["kv_bytes"]
    assert pressed["avg_visual_tokens"] == keep_all["avg_visual_tokens"]  # a press cuts no tokens


def test_frame_chunks_count_frames_across_media_and_skip_text():
    places = [[-1, -1, -1, -1]] + [[0, frame, 0, 0] for frame in range(3) for _ in range(2)] + [[-1, -1, -1, -1]]
    places += [[1, 0, 0, 0], [1, 1, 0, 0]]  # a second video: its frames follow the first's
    geometry = torch.tensor([places])
    visual = geometry[..., 0] >= 0
    assert frame_chunks(geometry, visual, 2).tolist() == [[-1, 0, 0, 0, 0, 1, 1, -1, 1, 2]]


def test_bilevel_keeps_the_chunk_the_question_attends_to_and_pools_the_others():
    generator = torch.Generator().manual_seed(3)
    keys = torch.randn(1, 1, 10, 8, generator=generator) * 0.1
    keys[0, 0, 5:9] = 3 * torch.ones(8)  # chunk 1 (entries 5-8) is what the last query looks at
    queries = torch.ones(1, 1, 1, 8)
    valid = torch.ones(1, 10, dtype=torch.bool)
    chunk = torch.tensor([[-1, 0, 0, 0, 0, 1, 1, 1, 1, -1]])
    inputs_ = PressInput(keys, keys, valid, chunk >= 0, queries, 1.0)
    assert bilevel_groups(inputs_, chunk, top=1, pool=2).tolist() == [[0, 1, 1, 2, 2, 3, 4, 5, 6, 7]]
    assert bilevel_groups(inputs_, chunk, top=1, pool=0).tolist() == [[0, -1, -1, -1, -1, 1, 2, 3, 4, 5]]
    three = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1, 1]])  # two chunks of odd sizes: each starts its own groups
    odd = PressInput(keys, keys, valid, three >= 0, queries, 1.0)
    assert bilevel_groups(odd, three, top=0, pool=2).tolist() == [[0, 0, 1, 2, 2, 3, 3, 4, 4, 5]]


@pytest.mark.parametrize("family", STREAMING_FAMILIES)
def test_bilevel_pools_each_layers_entries_into_the_means_of_their_groups(family):
    model, _ = model_and_processor(family)
    batch = inputs(family, True, rows=[0])
    full = _prefill_cache(model, batch)
    with mmtoken.patched(model, "bilevel", chunk=1, top=0, pool=2):
        pooled = _prefill_cache(model, batch)
    kinds = mmtoken.integrations.adapter_for(model).call_state(batch["input_ids"], batch["attention_mask"], batch).kinds
    visual = int((kinds != TEXT).sum())
    first_visual = int((kinds[0] != TEXT).nonzero()[0])
    for layer in (0, 1):  # the first layer too
        keys, full_keys = pooled.layers[layer].keys, full.layers[layer].keys
        assert keys.shape[2] < kinds.shape[1] - visual // 2 + visual  # pairs became one entry each
        expected = full_keys[0, :, first_visual : first_visual + 2].float().mean(1).to(full_keys.dtype)
        torch.testing.assert_close(keys[0, :, first_visual], expected)
        assert torch.equal(keys[0, :, :first_visual], full_keys[0, :, :first_visual])


@pytest.mark.parametrize(("family", "video"), CASES, ids=CASE_IDS)
def test_h2o_never_lets_a_layer_but_the_first_pass_its_capacity_while_decoding(family, video):
    model, _ = model_and_processor(family)
    batch = inputs(family, video, batch=2)
    held = []

    def watch(module, args, kwargs):  # what layer 1 holds as each step enters it
        held.append(cache_in(kwargs).layers[1].get_seq_length())

    hook = mmtoken.integrations.adapter_for(model).decoder_layers[1].register_forward_pre_hook(watch, with_kwargs=True)
    try:
        with mmtoken.patched(model, "h2o", capacity=20, recent=4), torch.no_grad():
            out = model.generate(**batch, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                 return_dict_in_generate=True)  # fmt: skip
    finally:
        hook.remove()
    layers = out.past_key_values.layers
    assert max(held[2:]) <= 20 and all(layer.get_seq_length() == 20 for layer in layers[1:])
    assert layers[0].get_seq_length() == batch["input_ids"].shape[1] + 11  # the first layer keeps every entry


def test_h2o_that_cannot_run_is_refused_at_patch_time():
    model, _ = model_and_processor("llava")
    with pytest.raises(ValueError, match="recent must be >= 1 and below capacity"):
        mmtoken.patch(model, "h2o", capacity=8, recent=8)
    with pytest.raises(ValueError, match="does not take h2o"):
        mmtoken.patch(model, "h2o", cuda_graphs=True)
    assert not model._forward_pre_hooks


def test_the_windows_a_press_reads_hold_only_their_own_rows(monkeypatch):
    """The last queries a press scores with are copies: a view would keep every layer's whole input alive until
    the press (measured on the H200: 17 GiB more than unpatched at 100,000 prompt tokens)."""
    from mmtoken.engine import hooks

    seen = []

    def watched(request, cache, scratch, *args):
        seen.extend(hidden.untyped_storage().nbytes() / hidden.nbytes for hidden, _ in scratch.windows.values())
        return pressing(request, cache, scratch, *args)

    pressing = hooks.press_cache
    monkeypatch.setattr(hooks, "press_cache", watched)
    model, _ = model_and_processor("llava")
    with mmtoken.patched(model, "snapkv", ratio=0.5):
        _prefill_cache(model, inputs("llava", False, batch=2))
    assert len(seen) == model.config.text_config.num_hidden_layers and set(seen) == {1.0}
