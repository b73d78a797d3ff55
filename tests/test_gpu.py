"""The invariants on a CUDA GPU, and the flash-attention path (2-D padding masks, no position ids).

Runs where a GPU is (the lent device; see BENCHMARKS.md for the command); CI has none and skips this module.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import CASE_IDS, CASES, PRUNING, greedy, greedy_run, inputs, method_cases
from transformers.utils import import_utils

import mmtoken
from mmtoken.compat import cache_of, with_cache
from mmtoken.encoding import encode
from mmtoken.engine import streaming
from mmtoken.graphs import prefill
from mmtoken.graphs.cache import CAPACITY_STEP
from mmtoken.graphs.prefill import SYNC_WARNING, PrefillGraphs
from mmtoken.graphs.segments import SEGMENT_ATTENTION
from mmtoken.graphs.vision import VisionGraphs
from mmtoken.integrations import adapter_for
from mmtoken.kernels import gather_rows, max_min, query_scores
from mmtoken.kernels.decode_attention import decode_attention, reference
from mmtoken.state import PIXELS
from mmtoken.zoo.tiny import tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
FLASH = [
    name
    for name, available in (
        ("flash_attention_2", "is_flash_attn_2_available"),
        ("flash_attention_4", "is_flash_attn_4_available"),
    )
    if getattr(import_utils, available, lambda: False)()
]


def on_gpu(family: str, attention: str, dtype: torch.dtype = torch.float32):
    model, _ = tiny_model(family, attn_implementation=attention)
    return model.to("cuda", dtype)


def to_gpu(batch, dtype: torch.dtype = torch.float32):
    return {
        key: value.to("cuda", dtype) if value.is_floating_point() else value.to("cuda") for key, value in batch.items()
    }


@pytest.mark.parametrize(("case", "method"), method_cases(PRUNING))
def test_gpu_batch_equals_rows_and_sdpa_equals_eager(case, method):
    family, video = case
    results = {}
    for attention in ("sdpa", "eager"):
        model = on_gpu(family, attention)
        with mmtoken.patched(model, method, **PRUNING[method]):
            together = greedy(model, to_gpu(inputs(family, video, batch=2)))
            alone = torch.cat([greedy(model, to_gpu(inputs(family, video, rows=[row]))) for row in range(2)])
        assert torch.equal(together, alone)
        results[attention] = together
    assert torch.equal(results["sdpa"], results["eager"])


# one of each way a method changes the prompt: a cut inside the language model (fastv, pdrop, feather, atp), before
# it (pooling, visionzip with the vision encoder's attention), merges (tome, holitom) and a merge across frames
FLASH_METHODS = ["fastv", "pdrop", "feather", "atp", "pooling", "visionzip", "tome", "holitom", "temporal"]


@pytest.mark.skipif(not FLASH, reason="no flash-attention package is installed")
@pytest.mark.parametrize(("case", "method"), method_cases({name: PRUNING[name] for name in FLASH_METHODS}))
def test_flash_attention_matches_sdpa_when_pruned(case, method):
    family, video = case
    batch = to_gpu(inputs(family, video, batch=2), torch.bfloat16)
    outputs, logits = [], []
    for attention in ("sdpa", FLASH[0]):
        model = on_gpu(family, attention, torch.bfloat16)
        with mmtoken.patched(model, method, **PRUNING[method]), torch.no_grad():
            outputs.append(greedy(model, batch))
            logits.append(model(**batch).logits[:, -1].float())
    assert (logits[0] - logits[1]).abs().max() < 5e-2
    assert torch.equal(outputs[0][:, :1], outputs[1][:, :1])


def _syncs_in_one_decode_step(model, batch) -> int:
    """Prefill `batch`, then count the host synchronisations that one decode step of the model makes."""
    with torch.no_grad():
        out = model(**batch, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        mask = torch.cat([batch["attention_mask"], batch["attention_mask"].new_ones(token.shape)], dim=1)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                model(input_ids=token, attention_mask=mask, use_cache=True, **with_cache(cache_of(out)))
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum(SYNC_WARNING in str(warning.message) for warning in caught)


@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("method", ["fastv", "pooling", "pdrop", "tome"])
def test_a_patched_decode_step_adds_no_host_synchronisation(method, rows):
    model = on_gpu("llava", "sdpa")
    batch = to_gpu(inputs("llava", False, batch=rows))
    unpatched = _syncs_in_one_decode_step(model, batch)
    with mmtoken.patched(model, method, **PRUNING[method]):
        assert _syncs_in_one_decode_step(model, batch) == unpatched


GRAPHED = {
    "keep-all": {"method": "fastv", "k": 2, "ratio": 1.0},
    "fastv": {"method": "fastv", "k": 2, "ratio": 0.4},
    "pooling + pdrop": {"method": "pipeline",
                        "stages": ({"method": "pooling", "stride": 2}, {"method": "pdrop", "layers": (2, 4)})},
    "atp": {"method": "atp", **PRUNING["atp"]},
}  # fmt: skip


@pytest.mark.parametrize(("family", "video"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("method", sorted(GRAPHED))
def test_graphed_decode_equals_eager(family, video, method):
    """Replayed CUDA graphs over fixed caches give the eager patch's tokens and logits, on a padded batch of two and
    long enough that each cache moves to a larger capacity (a second capture)."""
    model = on_gpu(family, "sdpa")
    batch = to_gpu(inputs(family, video, batch=2))
    runs = []
    for graphs in (False, True):
        with mmtoken.patched(model, cuda_graphs=graphs, **GRAPHED[method]):
            runs.append(greedy_run(model, batch, 2 * CAPACITY_STEP + 1))
    assert torch.equal(runs[1][0], runs[0][0])
    torch.testing.assert_close(runs[1][1], runs[0][1], rtol=1e-4, atol=1e-4)


def other_media(batch):
    return {key: value.flip(-1) if key in PIXELS.values() else value for key, value in batch.items()}


PREFILL_GRAPHED = {**GRAPHED, "pdrop": {"method": "pdrop", "layers": (2, 4)}}


@pytest.mark.parametrize("rows", [[1], [0, 1]], ids=["one row", "padded rows"])
@pytest.mark.parametrize(("family", "video"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("method", sorted(PREFILL_GRAPHED))
def test_graphed_prefill_equals_eager_for_other_media_of_one_signature(family, video, method, rows):
    """A signature's first prefill runs eagerly, the second is captured and the third replayed, each with other
    media than the one before: the tokens and logits of the eager patch. ATP decides its counts on the device, so
    its prefill stays eager."""
    model = on_gpu(family, "sdpa")
    batch = to_gpu(inputs(family, video, rows=rows))
    prompts = [batch, other_media(batch), batch, other_media(batch)]
    with mmtoken.patched(model, **PREFILL_GRAPHED[method]):
        expected = [greedy_run(model, prompt) for prompt in prompts]
    with mmtoken.patched(model, cuda_graphs=True, **PREFILL_GRAPHED[method]) as handle:
        runs = [greedy_run(model, prompt) for prompt in prompts]
        (prefill,) = [graphs for graphs in handle.graphs if isinstance(graphs, PrefillGraphs)]
        assert len(prefill.signatures()) == (0 if method == "atp" else 1)
    for (tokens, logits), (eager_tokens, eager_logits) in zip(runs, expected, strict=True):
        assert torch.equal(tokens, eager_tokens)
        torch.testing.assert_close(logits, eager_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("case", "method"), method_cases(["aim", "divprune", "fastv", "pdrop", "tome", "visionzip"]))
def test_graphed_prefill_of_questions_in_one_bucket_equals_eager(case, method, monkeypatch):
    """Questions of three lengths padded up to one bucket: the first runs eagerly, the second is captured, the
    third and fourth replayed; each gives the eager patch's tokens and logits, from one graph."""
    family, video = case
    monkeypatch.setattr(prefill, "PROMPT_STEP", 512)  # past every tiny prompt: one bucket
    model = on_gpu(family, "sdpa")
    prompts = [to_gpu(inputs(family, video, rows=[1], question_lengths=[length])) for length in (4, 9, 6, 4)]
    with mmtoken.patched(model, method, **PRUNING[method]):
        expected = [greedy_run(model, prompt) for prompt in prompts]
    with mmtoken.patched(model, method, cuda_graphs=True, **PRUNING[method]) as handle:
        runs = [greedy_run(model, prompt) for prompt in prompts]
        (graphs,) = [graphs for graphs in handle.graphs if isinstance(graphs, PrefillGraphs)]
        assert len(graphs.signatures()) == 1
    for (tokens, logits), (eager_tokens, eager_logits) in zip(runs, expected, strict=True):
        assert torch.equal(tokens, eager_tokens)
        torch.testing.assert_close(logits, eager_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl"])
def test_graphed_vision_tower_equals_eager_and_replays_one_capture(family):
    """Two generations of one batch: the tower is captured once and replayed, with the eager tower's results; a
    method that watches the tower's attention (VisionZip) keeps it eager, and so does an encoding asked for it."""
    model = on_gpu(family, "sdpa")
    batch = to_gpu(inputs(family, False, batch=2))
    with mmtoken.patched(model, "fastv", k=2, ratio=0.4):
        expected = greedy_run(model, batch)
    signal = encode(model, batch, signal=True).signals
    with mmtoken.patched(model, "fastv", k=2, ratio=0.4, cuda_graphs=True) as handle:
        first, second = greedy_run(model, batch), greedy_run(model, batch)
        (tower_graphs,) = [graphs for graphs in handle.graphs if isinstance(graphs, VisionGraphs)]
        assert len(tower_graphs.known.graphs) == 1
        segmented = adapter_for(model).segmented_tower  # Qwen's ViT: every segment of a block in one call
        if segmented is not None:
            assert segmented.config._attn_implementation == SEGMENT_ATTENTION
        # a signal asked of the graphed tower: it runs eagerly for it, so its attention is seen
        graphed_signal = encode(model, batch, signal=True).signals
    torch.testing.assert_close(graphed_signal, signal)
    for run in (first, second):
        assert torch.equal(run[0], expected[0])
        torch.testing.assert_close(run[1], expected[1], rtol=1e-4, atol=1e-4)
    with mmtoken.patched(model, "visionzip", ratio=0.5, cuda_graphs=True) as handle:
        assert not any(isinstance(graphs, VisionGraphs) for graphs in handle.graphs)


@torch.no_grad()
def test_a_streamed_chunk_attends_by_flash_attention_at_onevision_7b_sizes():
    """A chunk of 8 frames over 20,000 keys, on OneVision-7B's heads (28 query, 4 key/value, 128 wide, bf16): flash
    attention runs, causal aligned to the last key, with the result of sdpa over the explicit mask and repeated
    heads, and without memory the size of that mask or of the repeated keys."""
    chunk, keys, heads, kv_heads = 1568, 20_000, 28, 4
    query = torch.randn(1, heads, chunk, 128, device="cuda", dtype=torch.bfloat16)
    key, value = (torch.randn(1, kv_heads, keys, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    assert streaming.flash_runs(query, key, value, 0.0, True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    held = torch.cuda.memory_allocated()
    out, _ = streaming.streamed_attention(None, query, key, value, None, scaling=128**-0.5)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - held
    mask = torch.ones(chunk, keys, dtype=torch.bool, device="cuda").tril(keys - chunk)
    repeated = [tensor.repeat_interleave(heads // kv_heads, dim=1) for tensor in (key, value)]
    expected = torch.nn.functional.scaled_dot_product_attention(query, *repeated, attn_mask=mask, scale=128**-0.5)
    torch.testing.assert_close(out, expected.transpose(1, 2), rtol=2e-2, atol=2e-2)
    assert extra < mask.numel()  # the output, its copy and flash's row statistics: less than the mask alone


@pytest.mark.parametrize(
    ("batch", "heads", "kv_heads", "capacity"),
    [(1, 32, 32, 704), (8, 32, 32, 704), (1, 28, 4, 6400), (8, 28, 4, 6400)],
    ids=["llava-1", "llava-8", "onevision-1", "onevision-8"],
)
def test_decode_attention_kernel_equals_the_reference_at_real_shapes(batch, heads, kv_heads, capacity):
    query = torch.randn(batch, 1, heads, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    keys = torch.randn(batch, kv_heads, capacity, 128, device="cuda", dtype=torch.bfloat16)
    values = torch.randn_like(keys)
    allowed = torch.rand(batch, capacity, device="cuda") < 0.9
    allowed[:, capacity - 64 :] = False
    out = decode_attention(query, keys, values, allowed, 128**-0.5)
    torch.testing.assert_close(out, reference(query, keys, values, allowed, 128**-0.5), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(
    ("batch", "heads", "kv_heads", "length"),
    [(1, 32, 32, 636), (8, 32, 32, 636), (1, 28, 4, 6272), (8, 28, 4, 6272)],
    ids=["llava-1", "llava-8", "onevision-1", "onevision-8"],
)
def test_query_scores_kernel_equals_the_reference_at_real_shapes(batch, heads, kv_heads, length):
    query = torch.randn(batch, heads, 128, device="cuda", dtype=torch.bfloat16)
    keys = torch.randn(batch, length, kv_heads * 128, device="cuda", dtype=torch.bfloat16).view(batch, length, -1, 128)
    angles = torch.rand(batch, length, 64, device="cuda") * 100
    cos, sin = (torch.cat([f(angles)] * 2, -1).to(torch.bfloat16) for f in (torch.cos, torch.sin))
    valid = torch.rand(batch, length, device="cuda") < 0.95
    out = query_scores.query_scores(query, keys, cos, sin, valid, 128**-0.5)
    expected = query_scores.reference(query, keys, cos, sin, valid, 128**-0.5)
    torch.testing.assert_close(out, expected, rtol=5e-2, atol=1e-4)
    kept = [
        torch.isin(a, b).float().mean() for a, b in zip(out.topk(64).indices, expected.topk(64).indices, strict=True)
    ]
    assert min(kept) > 0.8  # bf16 rounding reorders near-equal scores, rarely more


@pytest.mark.parametrize(
    ("source_shape", "rows"), [((8, 1, 636, 4096), 124), ((8, 32, 636, 128), 124), ((1, 4, 6272, 128), 700)]
)
def test_gather_rows_kernel_equals_the_reference_at_real_shapes(source_shape, rows):
    source = torch.randn(*source_shape, device="cuda", dtype=torch.bfloat16)
    index = torch.randint(0, source_shape[2], (source_shape[0], rows), device="cuda")
    assert torch.equal(gather_rows.gather_rows(source, index), gather_rows.reference(source, index))


@pytest.mark.parametrize(("batch", "length", "count"), [(1, 636, 64), (8, 636, 192), (1, 6333, 697)])
def test_max_min_kernel_equals_the_reference_at_real_shapes(batch, length, count):
    unit = torch.nn.functional.normalize(torch.randn(batch, length, 64, device="cuda"), dim=-1)
    distance = 1 - unit @ unit.transpose(1, 2)
    candidates = torch.ones(batch, length, dtype=torch.bool, device="cuda")
    candidates[:, :30] = False  # the text before the image
    first = torch.full((batch, 1), 40, device="cuda")
    expected = max_min.reference(distance, candidates, first, count)
    assert torch.equal(max_min.greedy_order(distance, candidates, first, count), expected)


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision"])
@pytest.mark.parametrize("method", ["tome", "aim", "holitom"])
def test_a_merging_method_gives_the_same_bits_on_every_run(family, method):
    """Merges sum their members into slots; CUDA's scatter_add adds in its threads' order, which moved ToMe's
    logits on the tiny Qwen2-VL by up to 4.7e-4 between two runs of one prompt. Every run now gives the same bits."""
    model = on_gpu(family, "sdpa")
    batch = to_gpu(inputs(family, method == "holitom"))
    with mmtoken.patched(model, method, **PRUNING[method]):
        runs = [greedy_run(model, batch) for _ in range(4)]
    for tokens, logits in runs[1:]:
        assert torch.equal(tokens, runs[0][0]) and torch.equal(logits, runs[0][1])


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_5_vl"])
def test_a_streamed_prefill_takes_a_videos_pixels_from_host_memory_a_chunk_at_a_time(family):
    """A long video's pixels need not fit on the GPU: left in (pinned) host memory, each chunk's frames come over
    as they are encoded, with the answer of the pixels on the device."""
    model = on_gpu(family, "sdpa")
    batch = to_gpu(inputs(family, True))
    host = batch | {"pixel_values_videos": batch["pixel_values_videos"].cpu().pin_memory()}
    with mmtoken.patched(model, "snapkv", capacity=8, chunk_frames=1):
        expected_tokens, expected_logits = greedy_run(model, batch)
        tokens, logits = greedy_run(model, host)
    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)
