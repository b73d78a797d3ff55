"""The invariants every method keeps on every supported family: keep-all is the unpatched model, unpatch
restores it bit for bit, a padded batch equals its rows alone, sdpa equals eager, each layer's KV cache holds
exactly its tokens, and calls leave nothing behind."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    KEEP_ALL,
    PRUNING,
    greedy,
    greedy_logits,
    greedy_run,
    inputs,
    method_cases,
    model_and_processor,
    unpatched,
)

import mmtoken
from mmtoken.compat import cache_of
from mmtoken.state import TEXT


@pytest.mark.parametrize(("case", "method"), method_cases(KEEP_ALL))
def test_keep_all_equals_unpatched(case, method):
    family, video = case
    model, _ = model_and_processor(family)
    batch = inputs(family, video, batch=2)
    expected_logits, expected_tokens = unpatched(family, video)
    with mmtoken.patched(model, method, **KEEP_ALL[method]) as handle, torch.no_grad():
        logits = model(**batch).logits
        tokens = greedy(model, batch)
    assert handle.stats.avg_visual_tokens == handle.stats.original_visual_tokens
    assert torch.equal(tokens, expected_tokens)
    assert (logits - expected_logits).abs().max() < 1e-4


def test_unpatch_restores_the_model_bit_for_bit(case):
    family, video = case
    model, _ = model_and_processor(family)
    batch = inputs(family, video, batch=2)
    with torch.no_grad():
        before = model(**batch).logits
        with mmtoken.patched(model, "pdrop", **PRUNING["pdrop"]):
            pruned = model(**batch).logits
        after = model(**batch).logits
    assert pruned.shape[1] < before.shape[1]
    assert torch.equal(before, after)
    assert not model._forward_pre_hooks and not model._forward_hooks


@pytest.mark.parametrize(("case", "method"), method_cases(PRUNING))
def test_padded_batch_equals_rows_alone(case, method):
    family, video = case
    model, _ = model_and_processor(family)
    batch = inputs(family, video, batch=2)
    assert not batch["attention_mask"].all(), "the batch must be left-padded"
    rows = [inputs(family, video, rows=[row]) for row in range(2)]
    with mmtoken.patched(model, method, **PRUNING[method]) as handle, torch.no_grad():
        together, logits = greedy_run(model, batch)
        batch_stats = handle.stats
        alone = [greedy_run(model, row) for row in rows]
    assert batch_stats.avg_visual_tokens < batch_stats.original_visual_tokens
    assert torch.equal(together, torch.cat([tokens for tokens, _ in alone]))
    assert (logits - torch.cat([row_logits for _, row_logits in alone])).abs().max() < 1e-4


@pytest.mark.parametrize(("case", "method"), method_cases(PRUNING))
def test_sdpa_equals_eager_when_pruned(case, method):
    family, video = case
    batch = inputs(family, video, batch=2)
    outputs = []
    for attention in ("sdpa", "eager"):
        model, _ = model_and_processor(family, attention)
        with mmtoken.patched(model, method, **PRUNING[method]):
            outputs.append(greedy(model, batch))
    assert torch.equal(*outputs)


@pytest.mark.parametrize(("case", "method"), method_cases(PRUNING))
def test_each_layer_caches_exactly_its_tokens(case, method):
    family, video = case
    model, _ = model_and_processor(family)
    batch = inputs(family, video, batch=2)
    new_tokens = 3
    with mmtoken.patched(model, method, **PRUNING[method]) as handle:
        out = model.generate(
            **batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, return_dict_in_generate=True
        )
        call = handle.latest_call
    cache = cache_of(out)
    for index, layer in enumerate(cache.layers):
        tokens = call.set_at(index)
        assert layer.keys.shape[-2] == len(tokens) + new_tokens - 1
        alive_visual = call.visual(tokens).sum(1).float().mean()
        assert alive_visual == handle.stats.visual_tokens_per_layer[index]
    element = cache.layers[0].keys.element_size()
    expected = sum(2 * layer.keys.numel() * element for layer in cache.layers)
    assert handle.stats.kv_bytes == expected


def test_calls_leave_no_state_behind(case):
    family, video = case
    model, _ = model_and_processor(family)
    first, second = inputs(family, video, rows=[0]), inputs(family, video, rows=[1])
    with mmtoken.patched(model, "fastv", **PRUNING["fastv"]) as handle:
        a = greedy(model, first)
        a_tokens = handle.stats.original_visual_tokens
        greedy(model, second)
        again = greedy(model, first)
        assert handle.stats.original_visual_tokens == a_tokens
    assert torch.equal(a, again)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("method", ["fastv", "pdrop", "pooling", "tome", "aim", "holitom", "pipeline", "divprune"])
def test_rows_without_padding_that_keep_different_counts(attention, method):
    """Two unpadded rows of 16 and 24 visual tokens: the model passes no mask under sdpa, so the engine builds
    one to hide the fillers that even out the rows. Those fillers are dropped visual tokens, which merges must
    treat as dropped."""
    model, _ = model_and_processor("qwen2_vl", attention)
    lengths = [13, 5]
    batch = inputs("qwen2_vl", False, batch=2, question_lengths=lengths)
    assert batch["attention_mask"].all()
    rows = [inputs("qwen2_vl", False, rows=[row], question_lengths=[lengths[row]]) for row in (0, 1)]
    with mmtoken.patched(model, method, **PRUNING[method]) as handle:
        together = greedy_logits(model, batch)
        assert not handle.latest_call.set_at(5).complete
        alone = torch.cat([greedy_logits(model, row) for row in rows])
    assert (together - alone).abs().max() < 1e-4


def test_visual_fillers_stay_out_of_an_inner_merge():
    """HoliTom's outer merge leaves row 0 more visual tokens than row 1 and no padding; at the inner merge both rows
    keep 10, so row 0 is filled up with dropped visual tokens, which must merge away like the rest, not absorb."""
    model, _ = model_and_processor("llava_onevision")
    lengths = [5, 8]
    batch = inputs("llava_onevision", True, batch=2, question_lengths=lengths)
    rows = [inputs("llava_onevision", True, rows=[row], question_lengths=[lengths[row]]) for row in (0, 1)]
    with mmtoken.patched(model, "holitom", ratio=0.3, threshold=0.9, layer=3) as handle:
        together = greedy_logits(model, batch)
        call = handle.latest_call
        outer_counts = call.visual(call.sets[0]).sum(1).tolist()
        assert outer_counts[0] > outer_counts[1]
        fillers = (call.kinds.gather(1, call.sets[3].position) != TEXT) & ~call.sets[3].valid
        assert fillers[0].any()
        alone = torch.cat([greedy_logits(model, row) for row in rows])
    assert (together - alone).abs().max() < 1e-4


@pytest.mark.parametrize("method", ["pdrop", "visionzip"])
@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl"])
def test_beam_search_keeps_the_invariants(family, method):
    """Beam search expands the batch and reorders the cache (and, for VisionZip, repeats rows whose media were
    encoded once): keep-all still equals unpatched, and a pruned padded batch still equals its rows alone."""
    model, _ = model_and_processor(family)
    batch = inputs(family, False, batch=2)
    beams = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False, "num_beams": 3}
    expected = model.generate(**batch, **beams)
    with mmtoken.patched(model, method, **KEEP_ALL[method]):
        assert torch.equal(model.generate(**batch, **beams), expected)
    with mmtoken.patched(model, method, **PRUNING[method]):
        together = model.generate(**batch, **beams)[:, -4:]
        alone = [model.generate(**inputs(family, False, rows=[row]), **beams)[:, -4:] for row in range(2)]
    assert torch.equal(together, torch.cat(alone))


@pytest.mark.parametrize("method", ["pdrop", "random"])
def test_alive_visual_tokens_nest_and_match_the_stats(case, method):
    family, video = case
    model, _ = model_and_processor(family)
    batch = inputs(family, video, batch=2)
    with mmtoken.patched(model, method, **PRUNING[method]) as handle:
        assert handle.alive_visual_tokens() is None
        greedy(model, batch, new_tokens=2)
        alive = handle.alive_visual_tokens()
        depth = len(handle.stats.visual_tokens_per_layer)
        cuts = handle.method.cuts(depth, int(handle.stats.original_visual_tokens))
    assert sorted(alive) == sorted({0} | {cut.layer for cut in cuts})
    previous = None
    for layer, rows in alive.items():
        assert sum(len(row) for row in rows) / len(rows) == handle.stats.visual_tokens_per_layer[layer]
        cells = [{tuple(token) for token in row.tolist()} for row in rows]
        assert [len(row) for row in cells] == [len(row) for row in rows]
        if previous is not None:
            assert all(now <= before for now, before in zip(cells, previous, strict=True))
        previous = cells


def test_alive_visual_tokens_of_keep_all_cover_the_whole_grid():
    model, _ = model_and_processor("llava")
    with mmtoken.patched(model, "random", ratio=1.0) as handle:
        greedy(model, inputs("llava", False), new_tokens=1)
    (row,) = handle.alive_visual_tokens()[0]
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    assert sorted(map(tuple, row[:, 2:].tolist())) == [(r, c) for r in range(side) for c in range(side)]
    assert (row[:, :2] == 0).all()
