"""The KV memory harness on the CPU with the tiny OneVision model: its long videos are the real frames repeated (on
OneVision and Qwen2.5-VL), and its rows show what the presses keep."""

from __future__ import annotations

import gc
import itertools
import warnings

import pytest
import torch
from conftest import greedy_run, model_and_processor
from torch.nn.attention.bias import CausalBias
from torch.utils._python_dispatch import TorchDispatchMode

import mmtoken
from mmtoken.encoding import encode, feeding
from mmtoken.engine import streaming
from mmtoken.engine.embedding import ChunkedPrompt
from mmtoken.evaluation import kv_memory
from mmtoken.state import IMAGE, VIDEO
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
    if family == "qwen2_5_vl":  # its pixels too, as the tower encodes them (OneVision's stay one frame's view)
        one, _ = kv_memory.lengthened(model, inputs, encoded, 12, batch=1)
        encoded_here = model(**kv_memory.with_pixels(model, inputs, one)).logits
        torch.testing.assert_close(encoded_here, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", [FAMILY, "qwen2_5_vl"])
@torch.no_grad()
def test_streamed_press_holds_its_capacity_however_long_the_video(family):
    model, _, _, inputs, encoded = _base(family)
    grid = kv_memory.settings("snapkv", capacity=8, chunk_frames=1)
    rows = kv_memory.measure_length(model, inputs, encoded, grid, frames=[2, 4], streamed_only=[8], device="cpu")
    kv = {(row["setting"], row["frames"]): row.get("kv_bytes") for row in rows}
    unpatched, after, streamed, from_pixels = (setting.label for setting in grid)
    tokens = {row["frames"]: row["prompt_tokens"] + 1 for row in rows}  # and the first new token's entry
    # unpatched, the cache grows with every frame's tokens; pressed, every layer, the first too, keeps `capacity`
    # visual entries, after the prefill as streamed: the cache is flat
    assert kv[unpatched, 4] / kv[unpatched, 2] == tokens[4] / tokens[2]
    assert kv[after, 4] == kv[streamed, 4] < kv[unpatched, 4]
    assert kv[streamed, 8] == kv[streamed, 4] == kv[streamed, 2] == kv[after, 2]
    assert all(kv[from_pixels, count] == kv[streamed, count] for count in (2, 4, 8))
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


def test_a_chunked_prompt_embeds_each_chunk_as_the_models_merge_does():
    generator = torch.Generator().manual_seed(0)
    embed = torch.nn.Embedding(9, 4)
    ids = torch.tensor([[1, 3, 3, 3, 2, 5, 5], [3, 3, 1, 5, 3, 3, 2]])
    kinds = torch.zeros_like(ids)
    kinds[ids == 3], kinds[ids == 5] = IMAGE, VIDEO
    images, videos = [torch.randn(n, 4, generator=generator) for n in (2, 3, 2)], [torch.randn(3, 4)]
    prompt = ChunkedPrompt(ids, kinds, {IMAGE: images, VIDEO: videos}, embed)
    merged = embed(ids)
    for kind, pieces in ((IMAGE, images), (VIDEO, videos)):
        merged = merged.masked_scatter((kinds == kind)[..., None], torch.cat(pieces))
    with torch.no_grad():
        for bounds in ([0, 7], [0, 2, 3, 6, 7], list(range(8))):
            chunks = [prompt.embeddings(start, end) for start, end in itertools.pairwise(bounds)]
            assert torch.equal(torch.cat(chunks, 1), merged)
    assert torch.equal(torch.cat(prompt.run(1, 4, 6)), merged[1, 4:6])  # a run read by its features alone
    with pytest.raises(ValueError, match="holds 7 image tokens but its images' features have 6"):
        ChunkedPrompt(ids, kinds, {IMAGE: [*images[:2], images[2][:1]], VIDEO: videos}, embed)


class MadeTensors(TorchDispatchMode):
    """Records the shape of every new floating tensor an operation makes (views and in-place results aside)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[torch.Size] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view and not func._schema.is_mutable:
            for tensor in out if isinstance(out, tuple | list) else [out]:
                if torch.is_tensor(tensor) and tensor.is_floating_point():
                    self.shapes.append(tensor.shape)
        return out


@pytest.mark.parametrize("family", [FAMILY, "qwen2_5_vl"])
@torch.no_grad()
def test_a_streamed_prefill_never_makes_the_whole_prompts_hidden_states(family):
    model, _, _, inputs, encoded = _base(family, frames=4)
    long_inputs, long_encoded = kv_memory.lengthened(model, inputs, encoded, 32, batch=1)
    length, hidden = long_inputs["input_ids"].shape[1], model.config.text_config.hidden_size
    embedded = []
    embedding = model.get_input_embeddings()
    hook = embedding.register_forward_hook(lambda module, args, out: embedded.append(args[0].shape[1]))
    made = MadeTensors()
    try:
        with mmtoken.patched(model, "snapkv", capacity=8, chunk_frames=2), feeding(model, long_encoded), made:
            greedy_run(model, long_inputs, new_tokens=2)
    finally:
        hook.remove()
    chunks = embedded[:-1]  # the prompt, chunk by chunk, then the decode step of the second new token
    assert sum(chunks) == length and len(chunks) >= 8 and embedded[-1] == 1
    states = [shape for shape in made.shapes if shape[-1:] == (hidden,)]
    assert states and max(shape.numel() for shape in states) <= max(chunks) * hidden


@pytest.mark.parametrize("family", [FAMILY, "qwen2_5_vl"])
@torch.no_grad()
def test_a_streamed_prefill_from_pixels_makes_no_larger_tensor_for_a_longer_video(family):
    """Real frames given as pixels, 16 and then 64 of them, in chunks of 2: the largest tensor the prefill and
    decode make, in the vision tower as in the language model, is the same: a chunk's, never the video's."""
    model, processor = model_and_processor(family)
    largest = []
    for frames in (16, 64):
        inputs = _prompt(processor, [_draw((64, 64), 0, step) for step in range(frames)])
        made = MadeTensors()
        with mmtoken.patched(model, "snapkv", capacity=8, chunk_frames=2), made:
            greedy_run(model, inputs, new_tokens=2)
        largest.append(max(shape.numel() for shape in made.shapes))
    assert largest[0] == largest[1]


@pytest.mark.parametrize("family", [FAMILY, "qwen2_5_vl"])
@pytest.mark.parametrize("rows", [1, 2])
@torch.no_grad()
def test_a_streamed_prefill_encodes_each_chunks_frames_as_it_enters_and_answers_as_the_whole_encoding(family, rows):
    """8 frames, chunks of 2 (Qwen: of 2 time steps, 4 frames): the vision tower runs once per chunk and row, on
    that chunk's frames, just before the chunk enters the language model; the answer is the one the whole video
    encoded at once gives."""
    model, processor, frames, _, _ = _base(family, frames=8)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "what moves"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text] * rows, videos=[frames] * rows, return_tensors="pt")
    tower = model.model.visual if family == "qwen2_5_vl" else model.model.vision_tower
    runs, patches = (2, len(inputs["pixel_values_videos"]) // (2 * rows)) if family == "qwen2_5_vl" else (4, 2)
    with mmtoken.patched(model, "snapkv", capacity=8, chunk_frames=2):
        with feeding(model, encode(model, inputs)):
            expected_tokens, expected_logits = greedy_run(model, inputs)
        events = []
        first_layer = model.get_decoder().layers[0]
        hooks = [tower.register_forward_pre_hook(lambda module, args: events.append(len(args[0]))),
                 first_layer.register_forward_pre_hook(lambda *_: events.append("chunk"))]  # fmt: skip
        try:
            tokens, logits = greedy_run(model, inputs)
        finally:
            for hook in hooks:
                hook.remove()
    assert events[: runs * (rows + 1)] == ([patches] * rows + ["chunk"]) * runs
    assert patches not in events[runs * (rows + 1) :]  # the decode steps encode nothing
    assert torch.equal(tokens, expected_tokens) and (logits - expected_logits).abs().max() < 1e-4


def _tensors_on(pointer: int) -> list[torch.Tensor]:
    """Every live tensor whose memory starts at `pointer`."""
    gc.collect()
    with warnings.catch_warnings():  # asking whether torch.distributed's deprecated `reduce_op` is a tensor warns
        warnings.simplefilter("ignore", FutureWarning)
        objects = [obj for obj in gc.get_objects() if torch.is_tensor(obj)]
    return [tensor for tensor in objects if tensor.untyped_storage().data_ptr() == pointer]


@torch.no_grad()
def test_a_streamed_request_lets_go_of_the_media_features_once_prefilled():
    model, _, _, inputs, encoded = _base(FAMILY, frames=4)
    long_inputs, long_encoded = kv_memory.lengthened(model, inputs, encoded, 8, batch=1)
    pointer = long_encoded.features[VIDEO].pooler_output.untyped_storage().data_ptr()
    with mmtoken.patched(model, "snapkv", capacity=8, chunk_frames=2):
        with feeding(model, long_encoded):
            cache = model(**long_inputs, use_cache=True).past_key_values
        assert _tensors_on(pointer)
        del long_encoded
        assert not _tensors_on(pointer)  # the cache, which owns the request, holds none of the features
        assert cache.layers[0].get_seq_length() > 0


def test_growth_is_the_added_peak_per_prompt_token_from_the_shortest_run_to_the_longest():
    def row(setting, tokens, peak, before=1000):
        return {"measurement": "length", "setting": setting, "prompt_tokens": tokens, "peak_memory_bytes": peak,
                "allocated_before_bytes": before}  # fmt: skip

    rows = [row("flat", 100, 5000), row("flat", 1000, 5000, before=3000), row("grows", 100, 2000),
            row("grows", 500, 6000), row("grows", 1100, 12000), row("once", 100, 9000),
            {"measurement": "length", "setting": "grows", "prompt_tokens": 5000, "out_of_memory": True}]  # fmt: skip
    assert kv_memory.growth(rows) == {"flat": -2000 / 900, "grows": 10.0}


def test_batches_tried_say_what_was_reserved_and_where_an_out_of_memory_one_failed():
    """A batch that ran out of memory says what was allocated and reserved when it failed, so a card far from full
    (fragmentation) reads apart from a full one; one that ran says its reserve beside its peak."""
    gib = 2**30
    ran = {
        "measurement": "concurrency",
        "setting": "streamed",
        "frames": 64,
        "batch": 96,
        "ttft_ms": 1.0,
        "decode_tokens_per_s": 10.0,
        "peak_memory_bytes": 51 * gib,
        "peak_reserved_bytes": 60 * gib,
    }
    failed = {"measurement": "concurrency", "setting": "streamed", "frames": 64, "batch": 128, "out_of_memory": True,
              "failed_at_allocated_bytes": 62 * gib, "failed_at_reserved_bytes": 79 * gib}  # fmt: skip
    table = kv_memory.markdown([ran, failed], {})
    assert "streamed x96: 51.00 GiB (reserved 60.00 GiB)" in table
    assert "streamed x128: out of memory at 62.00 GiB allocated, 79.00 GiB reserved" in table
    length = {
        "measurement": "length",
        "setting": "unpatched",
        "frames": 512,
        "prompt_tokens": 100_000,
        "out_of_memory": True,
        "failed_at_allocated_bytes": 70 * gib,
        "failed_at_reserved_bytes": 71 * gib,
    }
    assert "| 512 (100,000) | out of memory at 70.00 GiB allocated, 71.00 GiB reserved |" in kv_memory.markdown(
        [length], {})  # fmt: skip


def test_settings_can_leave_out_all_but_the_unpatched_model():
    labels = [setting.label for setting in kv_memory.settings("snapkv", 8, 4, skip=("after", "encoded"))]
    assert labels == ["unpatched", "snapkv 8 streamed, 4-frame chunks"]
    assert len(kv_memory.settings("snapkv", 8, 4)) == 4
    assert kv_memory.parser().parse_args(["--skip", "after", "encoded"]).skip == ["after", "encoded"]
    with pytest.raises(SystemExit):  # the baseline of every ratio cannot be left out
        kv_memory.parser().parse_args(["--skip", "unpatched"])


def test_an_out_of_memory_attempt_says_how_much_was_asked_for_and_where():
    """The row of a run that ran out of memory names the allocation that failed and the line that made it, so a
    batch that fails far below the cap shows its culprit."""

    def runs_out():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.50 GiB. GPU 0 has a total capacity of")

    row = kv_memory.attempt(torch.nn.Linear(1, 1), kv_memory.Setting("unpatched"), runs_out)
    where = f"test_kv_memory.py:{runs_out.__code__.co_firstlineno + 1} runs_out"
    assert row["out_of_memory"]
    assert row["failed_allocation"] == f"Tried to allocate 3.50 GiB in {where}"
    length = {"measurement": "length", "setting": "unpatched", "frames": 32, "prompt_tokens": 9} | row
    assert f"(Tried to allocate 3.50 GiB in {where})" in kv_memory.markdown([length], {})
