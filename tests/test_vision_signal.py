"""The before-the-LLM and merging methods on tiny models: the vision signal is the attention an eager tower computes
and lands on the prompt token it belongs to, AIM's TextRank is PageRank over full attention, and merges keep
count of every original token."""

from __future__ import annotations

import pytest
import torch
from conftest import greedy, inputs, model_and_processor
from transformers.models.llama.modeling_llama import rotate_half

import mmtoken
from mmtoken.integrations import adapter_for
from mmtoken.integrations.vision import VisionWatch, module_input
from mmtoken.scorers.base import ScoreInput
from mmtoken.scorers.pagerank import TextRank
from mmtoken.state import IMAGE, TEXT


@pytest.mark.parametrize("family", ["llava", "llava_onevision"])
def test_vision_signal_equals_the_attention_of_an_eager_tower(family):
    """CLIP (LLaVA): the class token's attention row at the feature layer; SigLIP (OneVision, no class token): the
    mean attention each token receives there. The reference is the eager tower's own attention weights."""
    model, _ = model_and_processor(family, "eager")
    adapter = adapter_for(model)
    recorded = []
    hook = adapter.vision_attention.register_forward_pre_hook(
        lambda module, args, kwargs: recorded.append(adapter.vision_attention_signal(module, args, kwargs)),
        with_kwargs=True,
    )
    tower = model.model.vision_tower
    pixels = inputs(family, False, batch=2)["pixel_values"]
    try:
        with torch.no_grad():
            attentions = tower(pixels.flatten(0, -4), output_attentions=True).attentions
    finally:
        hook.remove()
    layer = next(i for i, block in enumerate(tower.encoder.layers) if block.self_attn is adapter.vision_attention)
    weights = attentions[layer].mean(1)
    expected = weights[:, 0] if family == "llava" else weights.mean(1)
    assert layer == len(tower.encoder.layers) + model.config.vision_feature_layer
    assert torch.allclose(recorded[0], expected, atol=1e-6)


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
def test_vision_signal_lands_on_the_prompt_token_fed_by_its_tower_token(family):
    """Number every token the tower outputs; after the adapter lays the numbers out as the model packs its features
    (tiles, unpadding, row separators), each prompt token must carry the number of the tower token whose projected
    feature it holds, and 0 where it holds `image_newline`."""
    model, _ = model_and_processor(family)
    batch = inputs(family, False, batch=2)
    adapter = adapter_for(model)

    def numbered(module, args, kwargs):
        tiles, tokens = module_input(args, kwargs).shape[:2]
        return torch.arange(1, tiles * tokens + 1, dtype=torch.float).view(tiles, tokens)

    adapter.vision_attention_signal = numbered
    watch = VisionWatch(adapter)
    watch.attach()
    try:
        with torch.no_grad():
            encoded = model.model.get_image_features(
                pixel_values=batch["pixel_values"],
                image_sizes=batch["image_sizes"],
                **({"batch_num_images": batch["batch_num_images"]} if "batch_num_images" in batch else {}),
            )
    finally:
        watch.detach()
    call = adapter.call_state(batch["input_ids"], batch["attention_mask"], batch)
    numbers = watch.take(call)[call.kinds != TEXT].long()
    features = torch.cat(encoded.pooler_output)
    tower_tokens = encoded.hidden_states[model.config.vision_feature_layer]
    with_class = int(model.config.vision_feature_select_strategy == "default")  # the class token is not passed on
    projected = model.model.multi_modal_projector(tower_tokens[:, with_class:]).flatten(0, 1)
    tile, place = (numbers - 1) // tower_tokens.shape[1], (numbers - 1) % tower_tokens.shape[1]
    source = tile * (tower_tokens.shape[1] - with_class) + place - with_class
    is_newline = numbers == 0
    assert is_newline.any() and (~is_newline).sum() > projected.shape[0] // 2
    assert torch.equal(features[~is_newline], projected[source[~is_newline]])
    assert torch.equal(features[is_newline], model.model.image_newline.expand(int(is_newline.sum()), -1))


def test_text_rank_is_pagerank_over_the_full_sharpened_attention():
    """The text rows only, gathered, against the full attention matrix of an explicit eager computation whose
    non-text rows are zeroed."""
    model, _ = model_and_processor("qwen2_vl")
    language = model.model.language_model
    layer = language.layers[1]
    torch.manual_seed(0)
    batch, length = 2, 12
    hidden = torch.randn(batch, length, model.config.text_config.hidden_size)
    candidates = torch.zeros(batch, length, dtype=torch.bool)
    candidates[:, 3:9] = True
    valid = torch.ones(batch, length, dtype=torch.bool)
    valid[1, :2] = False  # left padding
    candidates &= valid
    positions = torch.arange(length).expand(batch, -1)
    cos, sin = language.rotary_emb(hidden, positions[None].expand(3, -1, -1))
    inputs_ = ScoreInput(hidden, layer, (cos, sin), candidates, valid, lambda: None)
    inputs_.visual_counts = candidates.sum(1).tolist()
    with torch.no_grad():
        scores = TextRank().score(inputs_)
        attention = layer.self_attn
        states = layer.input_layernorm(hidden)
        query = attention.q_proj(states).view(batch, length, -1, attention.head_dim).transpose(1, 2)
        keys = attention.k_proj(states).view(batch, length, -1, attention.head_dim).transpose(1, 2)
        query = query * cos[:, None] + rotate_half(query) * sin[:, None]
        keys = keys * cos[:, None] + rotate_half(keys) * sin[:, None]
        keys = keys.repeat_interleave(query.shape[1] // keys.shape[1], dim=1)
        logits = query @ keys.transpose(2, 3) * attention.scaling / 0.1
        allowed = torch.ones(length, length, dtype=torch.bool).tril() & valid[:, None, None, :]
        weights = logits.masked_fill(~allowed, float("-inf")).softmax(-1)
        text = valid & ~candidates
        weights = torch.where(text[:, None, :, None], weights, 0.0)
        rank = (valid.float() / valid.sum(1, keepdim=True))[:, None, None, :].expand(-1, weights.shape[1], -1, -1)
        for _ in range(5):
            rank = rank @ weights
        expected = rank[:, :, 0].pow(2).mean(1).sqrt()
    assert torch.allclose(scores, expected, atol=1e-6)


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_5_vl"])
def test_merges_keep_count_of_every_original_token(family):
    """Temporal merging drops nothing, so the merge weights of the visual tokens it keeps add up to the original
    count; HoliTom's inner merge at layer 3 loses no weight either. Both report the budget they reached."""
    model, _ = model_and_processor(family)
    batch = inputs(family, True, batch=2)
    with mmtoken.patched(model, "temporal", budget=20) as handle:
        greedy(model, batch)
        call, stats = handle.latest_call, handle.stats
        kept = call.sets[0]
        weights = (kept.weight * call.visual(kept)).sum(1)
    assert weights.tolist() == call.visual_counts
    assert stats.avg_visual_tokens <= 20 < stats.original_visual_tokens
    with mmtoken.patched(model, "holitom", budget=12, layer=3) as handle:
        greedy(model, batch)
        call, stats = handle.latest_call, handle.stats
        outer, inner = ((tokens.weight * call.visual(tokens)).sum(1) for tokens in (call.sets[0], call.sets[3]))
    assert torch.equal(outer, inner) and (outer <= torch.tensor(call.visual_counts)).all()
    assert stats.visual_tokens_per_layer[3] < stats.visual_tokens_per_layer[0] < stats.original_visual_tokens
    assert stats.avg_visual_tokens == pytest.approx(12, abs=1.5)


def test_image_signal_of_a_batch_is_scattered_row_by_row():
    """The signal the engine hands to scorers sits on the image tokens of each row and nowhere else."""
    model, _ = model_and_processor("qwen2_vl")
    batch = inputs("qwen2_vl", False, batch=2)
    with mmtoken.patched(model, "visionzip", ratio=0.5) as handle:
        greedy(model, batch)
        call = handle.latest_call
    image = call.kinds == IMAGE
    assert (call.vision_signal[image] > 0).all() and (call.vision_signal[~image] == 0).all()
    per_frame = call.vision_signal[image].split(call.visual_counts)
    assert [float(signal.mean()) for signal in per_frame] == pytest.approx([1 / (4 * len(s)) for s in per_frame])
