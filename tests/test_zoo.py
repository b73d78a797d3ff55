"""The probe models' plumbing: training and inference see the same tokens and pixels, training resumes, and
the embedded model loads offline."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from mmtoken.zoo import ask, load, probe
from mmtoken.zoo.embedded import RELIABLE_TASKS
from mmtoken.zoo.recipes import probe_llava
from mmtoken.zoo.train import PromptEncoder, TrainConfig, pixel_values, train


@pytest.fixture(scope="module")
def recipe():
    return probe_llava()


def test_training_tokens_equal_the_processors(recipe):
    model, processor = recipe
    encoder = PromptEncoder(processor, model.config.image_seq_length)
    for sample in probe.generate("image", n=12, seed=3):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample.question}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        expected = processor(text=prompt, images=sample.images, return_tensors="pt")["input_ids"][0].tolist()
        assert list(encoder.prompt_ids(sample.question)) == expected
        assert processor.tokenizer.unk_token_id not in expected + encoder.answer_ids(sample.answer)
        assert processor.decode(encoder.answer_ids(sample.answer), skip_special_tokens=True) == sample.answer


def test_training_pixels_equal_the_processors(recipe):
    _, processor = recipe
    batch = probe.render_batch("image", 4, torch.Generator().manual_seed(0))
    pil = [Image.fromarray(pixels.permute(1, 2, 0).numpy()) for pixels in batch.pixels]
    expected = processor.image_processor(pil, return_tensors="pt")["pixel_values"]
    assert (pixel_values(batch, processor, torch.float32) - expected).abs().max() < 0.05


def test_training_runs_checkpoints_and_resumes(tmp_path):
    config = TrainConfig(steps=3, batch_size=2, eval_every=2, eval_per_task=1, warmup=2)
    state = train("probe-llava", tmp_path, config)
    assert state["step"] == 3 and len(state["evaluations"]) == 2
    saved = json.loads((tmp_path / "state.json").read_text())
    assert saved["step"] == 3 and set(saved["evaluations"][-1]["accuracy"]) == set(probe.tasks("image"))
    assert all(file.stat().st_size < 16_000_000 for file in tmp_path.glob("*.safetensors"))
    head = torch.load(tmp_path / "patch_head.pt")
    resumed = train("probe-llava", tmp_path, TrainConfig(steps=4, batch_size=2, eval_every=2, eval_per_task=1),
                    resume=tmp_path)  # fmt: skip
    assert resumed["step"] == 4 and resumed["samples"] == 8
    assert [(run["from_step"], run["resumed"]) for run in resumed["runs"]] == [(0, False), (3, True)]
    resumed_head = torch.load(tmp_path / "patch_head.pt")
    assert (resumed_head["weight"] - head["weight"]).abs().max() < 0.1, "the resumed run kept training the same head"
    model = AutoModelForImageTextToText.from_pretrained(tmp_path, local_files_only=True)
    assert model.config.image_seq_length == 576


def test_embedded_model_loads_offline_and_answers_its_reliable_tasks():
    model, processor = load("probe-llava")
    for task in RELIABLE_TASKS["probe-llava"]:
        samples = probe.generate("image", n=10, seed=4242, task=task)
        correct = sum(ask(model, processor, sample) == sample.answer for sample in samples)
        assert correct >= 8, f"{task}: {correct}/10"


def test_unknown_or_untrained_model_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown probe model 'probe-x'; embedded: probe-llava"):
        load("probe-x")
