"""Tests for the tiny offline model zoo (mmtoken.zoo.tiny)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from functools import cache
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    BatchFeature,
    PreTrainedModel,
    ProcessorMixin,
)

from mmtoken.zoo.tiny import FAMILIES, VIDEO_FAMILIES, tiny_inputs, tiny_model

CASES = [(family, False) for family in FAMILIES] + [(family, True) for family in FAMILIES if family in VIDEO_FAMILIES]
CASE_IDS = [f"{family}-{'video' if video else 'image'}" for family, video in CASES]

EXPECTED_VISUAL_TOKENS = {
    ("llava", False): [64, 64],
    ("llava_next", False): [268, 208],
    ("llava_onevision", False): [268, 208],
    ("llava_onevision", True): [65, 65],
    ("qwen2_vl", False): [16, 24],
    ("qwen2_vl", True): [32, 32],
    ("qwen2_5_vl", False): [16, 24],
    ("qwen2_5_vl", True): [32, 32],
}


@cache
def _sdpa_model(family: str) -> tuple[PreTrainedModel, ProcessorMixin]:
    return tiny_model(family)


def _greedy(model: PreTrainedModel, inputs: BatchFeature) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    return out[:, inputs["input_ids"].shape[1] :]


def _placeholder_counts(model: PreTrainedModel, inputs: BatchFeature, video: bool) -> list[int]:
    token_id = model.config.video_token_id if video else model.config.image_token_id
    return (inputs["input_ids"] == token_id).sum(dim=1).tolist()


@pytest.mark.parametrize(("family", "video"), CASES, ids=CASE_IDS)
def test_placeholders_match_model_features(family: str, video: bool) -> None:
    model, processor = _sdpa_model(family)
    inputs = tiny_inputs(processor, family, batch=2, video=video)
    assert _placeholder_counts(model, inputs, video) == EXPECTED_VISUAL_TOKENS[family, video]
    assert not (inputs["input_ids"] == processor.tokenizer.unk_token_id).any()
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[:2] == inputs["input_ids"].shape
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize(("family", "video"), CASES, ids=CASE_IDS)
def test_greedy_generation_batch1_and_padded_batch2(family: str, video: bool) -> None:
    model, processor = _sdpa_model(family)
    single = tiny_inputs(processor, family, batch=1, video=video)
    pair = tiny_inputs(processor, family, batch=2, video=video)
    assert not pair["attention_mask"][:, 0].all()
    assert pair["attention_mask"][:, -1].all()
    single_tokens, pair_tokens = _greedy(model, single), _greedy(model, pair)
    assert single_tokens.shape == (1, 3)
    assert pair_tokens.shape == (2, 3)
    assert torch.equal(pair_tokens[:1], single_tokens)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_reload_offline(family: str, tmp_path: Path) -> None:
    model, processor = _sdpa_model(family)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    reloaded_processor = AutoProcessor.from_pretrained(tmp_path)
    inputs = tiny_inputs(processor, family, batch=2)
    reloaded_inputs = tiny_inputs(reloaded_processor, family, batch=2)
    assert type(reloaded) is type(model)
    assert type(reloaded_processor) is type(processor)
    assert reloaded_processor.tokenizer.padding_side == "left"
    assert set(reloaded_inputs) == set(inputs)
    assert all(torch.equal(torch.as_tensor(inputs[key]), torch.as_tensor(reloaded_inputs[key])) for key in inputs)
    assert torch.equal(_greedy(reloaded, reloaded_inputs), _greedy(model, inputs))


@pytest.mark.parametrize("family", FAMILIES)
def test_attn_implementation_targets_text_model(family: str) -> None:
    model, processor = tiny_model(family, attn_implementation="eager")
    assert model.config.text_config._attn_implementation == "eager"
    assert not model.training and model.dtype == torch.float32
    assert len(model.get_decoder().layers) == 6
    inputs = tiny_inputs(processor, family, batch=2)
    assert torch.equal(_greedy(model, inputs), _greedy(_sdpa_model(family)[0], inputs))


def test_seed_controls_weights() -> None:
    weights = [tiny_model("llava", seed=seed)[0].lm_head.weight for seed in (0, 0, 1)]
    assert torch.equal(weights[0], weights[1])
    assert not torch.equal(weights[0], weights[2])


def test_unknown_family_and_unsupported_video() -> None:
    with pytest.raises(ValueError, match="llava_onevision"):
        tiny_model("blip")
    processor = _sdpa_model("llava")[1]
    with pytest.raises(ValueError, match="video"):
        tiny_inputs(processor, "llava", video=True)
    with pytest.raises(ValueError, match="question_lengths"):
        tiny_inputs(processor, "llava", batch=2, question_lengths=[3])
