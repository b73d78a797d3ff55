"""The probe models' plumbing: training and inference see the same tokens and pixels, training resumes, and
the embedded model loads offline."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from mmtoken.graphs.segments import SEGMENT_ATTENTION
from mmtoken.zoo import ask, card, load, probe
from mmtoken.zoo.embedded import RELIABLE_TASKS
from mmtoken.zoo.formats import probe_format
from mmtoken.zoo.recipes import RECIPES, WORLDS
from mmtoken.zoo.train import PromptEncoder, TrainConfig, train


@pytest.fixture(scope="module", params=sorted(RECIPES))
def recipe(request):
    """A fresh recipe's model, processor, format and the world it reads."""
    model, processor = RECIPES[request.param]()
    return model, processor, probe_format(model, processor), WORLDS[request.param]


def _media(sample: probe.Sample) -> tuple[str, dict]:
    if sample.images is not None:
        return "image", {"images": sample.images}
    return "video", {"videos": [sample.video]}


def test_training_tokens_equal_the_processors(recipe):
    _, processor, model_format, world = recipe
    encoder = PromptEncoder(processor, model_format)
    for kind in model_format.kinds:
        for sample in world.generate(kind, n=2 * len(world.tasks(kind)), seed=3):
            messages = [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": sample.question}]}]
            prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            expected = processor(text=prompt, return_tensors="pt", **_media(sample)[1])["input_ids"][0].tolist()
            assert list(encoder.prompt_ids(sample.question, kind)) == expected
            assert processor.tokenizer.unk_token_id not in expected + encoder.answer_ids(sample.answer)
            assert processor.decode(encoder.answer_ids(sample.answer), skip_special_tokens=True) == sample.answer


def test_training_pixels_equal_the_processors(recipe):
    _, processor, model_format, world = recipe
    for kind in model_format.kinds:
        batch = world.render_batch(kind, 2, torch.Generator().manual_seed(0))
        frames = batch.pixels if kind == "video" else batch.pixels[:, None]
        pil = [[Image.fromarray(frame.permute(1, 2, 0).numpy()) for frame in sample] for sample in frames]
        if kind == "image":
            expected = processor.image_processor([frames[0] for frames in pil], return_tensors="pt")
        else:
            expected = processor.video_processor(videos=pil, return_tensors="pt")
        mine = model_format.vision_inputs(batch, kind)
        assert mine.keys() == expected.keys()
        for key, value in mine.items():
            assert (value.float() - expected[key].float()).abs().max() < 0.05, key


def test_patch_targets_follow_the_patch_order(recipe):
    _, processor, model_format, _ = recipe
    batch = probe.render_batch("image", 2, torch.Generator().manual_seed(5), task="color")
    labels = torch.arange(2 * 24 * 24).view(2, 24, 24)
    # a label map that encodes each patch's pixels: the patch order of the targets must match the features'
    batch.pixels = (labels.view(2, 24, 1, 24, 1) % 251).expand(2, 24, 14, 24, 14).reshape(2, 1, 336, 336)
    batch.pixels = batch.pixels.expand(2, 3, 336, 336).to(torch.uint8)
    flat = model_format.vision_inputs(batch, "image")["pixel_values"]
    if flat.dim() == 4:  # LLaVA: the tower patchifies row-major itself
        flat = flat[:, 0].unfold(1, 14, 14).unfold(2, 14, 14).reshape(2 * 576, -1)
    first_pixel = ((flat[:, 0] * processor.image_processor.image_std[0] + processor.image_processor.image_mean[0])
                   * 255).round().long()  # fmt: skip
    assert torch.equal(first_pixel, model_format.patch_targets(labels) % 251)


def test_training_runs_checkpoints_and_resumes(tmp_path):
    config = TrainConfig(steps=3, batch_size=2, eval_every=2, eval_per_task=1, warmup=2)
    state = train("probe-llava", tmp_path, config)
    assert state["step"] == 3 and len(state["evaluations"]) == 2
    saved = json.loads((tmp_path / "state.json").read_text())
    assert saved["step"] == 3 and set(saved["evaluations"][-1]["accuracy"]) == set(probe.tasks("image"))
    assert set(saved["evaluations"][-1]["swapped_media"]) == set(probe.tasks("image"))
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


@pytest.mark.parametrize(("name", "scaled"), [("probe-llava", False), ("probe-llava-v2", True),
                                             ("probe-qwen2vl-v2", True)])  # fmt: skip
def test_v2_language_models_start_with_their_residual_outputs_scaled_by_depth(name, scaled):
    """GPT-2's initialisation on the 24-layer v2 models: attention outputs and MLP down projections start
    1 / sqrt(2 x 24) as large as the other projections; v1's 6 layers keep the plain initialisation."""
    model, _ = RECIPES[name]()
    layers = model.model.language_model.layers
    plain = torch.cat([layer.self_attn.q_proj.weight.flatten() for layer in layers]).std()
    for outputs in (
        [layer.self_attn.o_proj.weight for layer in layers],
        [layer.mlp.down_proj.weight for layer in layers],
    ):
        ratio = float(torch.cat([weight.flatten() for weight in outputs]).std() / plain)
        assert ratio == pytest.approx((2 * len(layers)) ** -0.5 if scaled else 1.0, rel=0.05)


def test_training_curve_shows_the_accuracy_with_media_swapped_where_a_run_recorded_it(tmp_path):
    curve = [{"step": 50, "kind": "image", "loss": 1.0, "aux": 0.0}]
    evaluations = [{"step": 50, "accuracy": {"color": 0.5, "count": 0.25}}]  # an older run: no swapped media
    assert "mean, media swapped" not in _legend(card.plot_curve({"curve": curve, "evaluations": evaluations},
                                                                 tmp_path / "old.png"))  # fmt: skip
    evaluations.append({"step": 100, "accuracy": {"color": 0.9, "count": 0.5},
                        "swapped_media": {"color": 0.2, "count": 0.4}})  # fmt: skip
    figure = card.plot_curve({"curve": curve, "evaluations": evaluations}, tmp_path / "new.png")
    line = next(line for line in figure.axes[1].get_lines() if line.get_label() == "mean, media swapped")
    assert list(line.get_xdata()) == [100] and list(line.get_ydata()) == pytest.approx([30.0])
    assert (tmp_path / "new.png").stat().st_size > 0


def _legend(figure) -> list[str]:
    return [line.get_label() for line in figure.axes[1].get_lines()]


def test_packed_vision_attention_equals_one_call_per_sequence():
    model, processor = RECIPES["probe-qwen2vl"]()
    model_format = probe_format(model.eval(), processor)
    batch = probe.render_batch("video", 2, torch.Generator().manual_seed(1))
    inputs = model_format.vision_inputs(batch, "video")
    with torch.no_grad():
        expected = model.model.visual(inputs["pixel_values_videos"], grid_thw=inputs["video_grid_thw"])
        model.model.visual.config._attn_implementation = SEGMENT_ATTENTION
        packed = model.model.visual(inputs["pixel_values_videos"], grid_thw=inputs["video_grid_thw"])
    assert torch.allclose(packed.last_hidden_state, expected.last_hidden_state, atol=1e-5)


@pytest.mark.parametrize("name", ["probe-qwen2vl", "probe-qwen2vl-v2"])
def test_qwen_training_alternates_images_and_videos_of_its_world(tmp_path, name):
    state = train(name, tmp_path, TrainConfig(steps=2, batch_size=2, eval_every=2, eval_per_task=1))
    world = WORLDS[name]
    assert set(state["evaluations"][-1]["accuracy"]) == set(world.tasks("image")) | set(world.tasks("video"))
    model = AutoModelForImageTextToText.from_pretrained(tmp_path, local_files_only=True)
    assert model.config.model_type == "qwen2_vl"


@pytest.mark.parametrize("name", sorted(RELIABLE_TASKS))
def test_embedded_model_loads_offline_and_answers_its_reliable_tasks(name):
    model, processor = load(name)
    for task in RELIABLE_TASKS[name]:
        kind = "image" if task in probe.tasks("image") else "video"
        samples = probe.generate(kind, n=10, seed=4242, task=task)
        correct = sum(ask(model, processor, sample) == sample.answer for sample in samples)
        assert correct >= 8, f"{name} {task}: {correct}/10"


def test_unknown_or_untrained_model_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown probe model 'probe-x'; embedded: probe-llava, probe-qwen2vl"):
        load("probe-x")


def test_model_card_blanks_every_frame_and_names_the_tasks_below_the_floor():
    video = probe.generate("video", n=1, seed=2)[0]
    grey = card.blanked(video)
    assert grey.images is None and len(grey.video) == len(video.video)
    assert all(frame.getextrema() == ((128, 128),) * 3 for frame in grey.video)
    rows = {"unpatched": {"order": 90, "events": 80, "needle": 100}, "video blanked": {"order": 50, "events": 20,
                                                                                       "needle": 10}}  # fmt: skip
    table = "\n".join(card.accuracy_table(rows, "video"))
    assert "| video blanked | 50 | 20 | 10 |" in table
    assert "Below the 85% floor unpatched: events;" in table
