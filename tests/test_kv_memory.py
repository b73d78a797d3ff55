"""The KV memory harness on the CPU with the tiny OneVision model: its long videos are the real frames repeated (on
OneVision and Qwen2.5-VL), and its rows show what the presses keep."""

from __future__ import annotations

import pytest
import torch
from conftest import greedy_run, model_and_processor
from torch.nn.attention.bias import CausalBias

import mmtoken
from mmtoken.encoding import encode, feeding
from mmtoken.engine import streaming
from mmtoken.engine.streaming import RowScatter
from mmtoken.evaluation import kv_memory
from mmtoken.zoo.tiny import _draw

FAMILY = "llava_onevision"


def _prompt(processor, frames):
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "what moves"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return processor(text=[text], videos=[frames], return_tensors="pt")


def _base(family: str = FAMILY, frames: int = 2):
    model, processor = model_and_processor(family)
    frames = [_draw((64, 64), 0, step) for step in range(frames)]
    inputs = _prompt(processor, frames)
    return model, processor, frames, inputs, encode(model, inputs)


@pytest.mark.parametrize("family", [FAMILY, "qwen2_5_vl"])
@torch.no_grad()
def test_a_lengthened_video_is_the_real_video_of_its_frames_repeated(family):
    model, processor, frames, inputs, encoded = _base(family, frames=4)
    real = _prompt(processor, frames * 3)
    long_inputs, long_encoded = kv_memory.lengthened(model, inputs, encoded, 12, batch=2)
    for name in ("input_ids", "mm_token_type_ids", "video_grid_thw"):
        if name in real:
            assert torch.equal(long_inputs[name][1], real[name][0]), name
    with feeding(model, long_encoded):
        fed = model(**long_inputs).logits
    expected = model(**real).logits
    torch.testing.assert_close(fed, expected.expand(2, -1, -1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", [FAMILY, "qwen2_5_vl"])
@torch.no_grad()
def test_streamed_press_holds_its_capacity_however_long_the_video(family):
    model, _, _, inputs, encoded = _base(family)
    grid = kv_memory.settings("snapkv", capacity=8, chunk_frames=1)
    rows = kv_memory.measure_length(model, inputs, encoded, grid, frames=[2, 4], streamed_only=[8], device="cpu")
    kv = {(row["setting"], row["frames"]): row.get("kv_bytes") for row in rows}
    unpatched, after, streamed = (setting.label for setting in grid)
    tokens = {row["frames"]: row["prompt_tokens"] + 1 for row in rows}  # and the first new token's entry
    # unpatched, the cache grows with every frame's tokens; a press keeps the first layer whole and `capacity`
    # visual entries in every other, so past the capacity it grows by the first layer's share only
    assert kv[unpatched, 4] / kv[unpatched, 2] == tokens[4] / tokens[2]
    assert kv[after, 4] == kv[streamed, 4] < kv[unpatched, 4]
    depth = model.config.text_config.num_hidden_layers
    per_entry = kv[unpatched, 2] // tokens[2] // depth
    assert kv[streamed, 8] - kv[streamed, 4] == per_entry * (tokens[8] - tokens[4])
    skipped = [row for row in rows if "skipped" in row]
    assert [(row["setting"], row["frames"]) for row in skipped] == [(unpatched, 8), (after, 8)]


@torch.no_grad()
def test_concurrency_doubles_the_batch_to_its_bound_and_reports_ratios():
    model, _, _, inputs, encoded = _base()
    grid = kv_memory.settings("snapkv", capacity=8, chunk_frames=1)[:2]
    rows = kv_memory.measure_concurrency(model, inputs, encoded, grid, 4, new_tokens=3, max_batch=3, device="cpu")
    assert [(row["setting"], row["batch"]) for row in rows] == [(setting.label, batch) for setting in grid
                                                                for batch in (1, 2, 3)]  # fmt: skip
    summary = kv_memory.summary(rows)
    assert [row["batch"] for row in summary] == [3, 3] and summary[0]["decode_ratio"] == 1.0
    assert all(row["decode_tokens_per_s"] > 0 for row in rows)
    assert "| snapkv 8 after prefill | 3 |" in kv_memory.markdown(rows, {})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_scatter_merges_as_masked_scatter_does(dtype):
    generator = torch.Generator().manual_seed(0)
    target = torch.randn(2, 7, 5, generator=generator).to(dtype)
    mask = torch.rand(2, 7, 1, generator=generator) > 0.5
    source = torch.randn(int(mask.sum()) + 3, 5, generator=generator).to(dtype)  # spare rows are left, as torch does
    expected = target.masked_scatter(mask, source)
    with RowScatter():
        merged = target.masked_scatter(mask, source)
        full = target.masked_scatter(mask.expand_as(target), source)  # an element-wise mask goes to torch's kernel
    assert torch.equal(merged, expected) and torch.equal(full, expected)


def test_row_scatter_merges_into_an_embedding_lookup_made_while_it_is_active():
    weight, ids = torch.randn(9, 5), torch.tensor([[1, 3, 3, 2, 3]])
    mask, source = (ids == 3)[..., None], torch.randn(3, 5)
    expected = torch.nn.functional.embedding(ids, weight).masked_scatter(mask, source)
    before = torch.nn.functional.embedding(ids, weight)
    with RowScatter():
        embeds = torch.nn.functional.embedding(ids, weight)
        merged, other = embeds.masked_scatter(mask, source), before.masked_scatter(mask, source)
    assert merged is embeds and torch.equal(merged, expected)  # the prompt's embeddings are never held twice
    assert torch.equal(other, expected) and torch.equal(before, torch.nn.functional.embedding(ids, weight))


@pytest.mark.parametrize("family", [FAMILY, "qwen2_5_vl"])
@torch.no_grad()
def test_streamed_chunks_attend_over_the_key_heads_with_no_mask_where_flash_attention_runs(family, monkeypatch):
    model, _, _, inputs, _ = _base(family, frames=4)
    with mmtoken.patched(model, "snapkv", capacity=8, chunk_frames=1):
        expected_tokens, expected_logits = greedy_run(model, inputs)  # on the CPU, over the causal mask
        calls = []

        def flash(query, key, value, **kwargs):  # what flash attention would be given, run on the CPU
            calls.append((key.shape[1], kwargs["attn_mask"], kwargs["enable_gqa"]))
            return torch.nn.functional.scaled_dot_product_attention(query, key, value, **kwargs)

        monkeypatch.setattr(streaming, "flash_runs", lambda *args: True)
        monkeypatch.setattr(streaming, "scaled_dot_product_attention", flash)
        tokens, logits = greedy_run(model, inputs)
    assert torch.equal(tokens, expected_tokens) and (logits - expected_logits).abs().max() < 1e-4
    heads = model.config.text_config.num_key_value_heads
    assert calls and all(keys == heads and isinstance(mask, CausalBias) and grouped for keys, mask, grouped in calls)
