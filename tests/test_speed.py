"""The speed harness end to end on the CPU with tiny models, and its real-size shapes' inputs."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from conftest import model_and_processor

from mmtoken.evaluation import speed

REAL_VISUAL_TOKENS = {
    "llava15-7b": 576,  # 24 x 24 CLIP patches
    "onevision-7b-video": 32 * 14 * 14 + 1,  # 27 x 27 SigLIP patches pooled to 14 x 14 per frame, one newline
    "qwen25vl-7b-image": 48 * 48,  # 96 x 96 patches of 1344 px, 2 x 2 merge
    "qwen25vl-7b-video": 16 * 16 * 16,  # 32 frames in temporal pairs, 32 x 32 patches of 448 px, 2 x 2 merge
}


@pytest.mark.parametrize("name", list(speed.SHAPES))
def test_real_shapes_give_the_checkpoints_visual_token_counts(name):
    shape = speed.SHAPES[name]()
    inputs = speed.prompt_inputs(shape, batch=2, device="cpu", dtype=torch.float32)
    config = shape.config
    token = config.image_token_id if shape.media == "image" else config.video_token_id
    assert (inputs["input_ids"] == token).sum(dim=1).tolist() == [REAL_VISUAL_TOKENS[name]] * 2


def test_harness_end_to_end_on_tiny_models(tmp_path):
    models, shapes = {}, {}
    for family, media, size in (("llava", "image", (112, 112)), ("qwen2_5_vl", "video", (112, 112))):
        model, processor = model_and_processor(family)
        frames = speed._frames(1 if media == "image" else 4, size)
        shapes[family] = speed.Shape(f"tiny {family} {media}", model.config, processor, media, frames)
        models[shapes[family].name] = model
    # visionzip reads the vision encoder's attention, so the harness encodes under its patch; holitom's default
    # layer 18 is past the tiny models' 6, so its settings are reported as skipped
    methods = "fastv pdrop visionzip holitom"
    options = f"--device cpu --dtype float32 --batch 2 --methods {methods} --repeats 1 --generate-repeats 1"
    options += " --questions 2"  # the rounds take two questions in turn
    args = speed.parser().parse_args([*options.split(), "--fractions", "0.5", "--out", str(tmp_path)])
    rows = speed.run(shapes, args, lambda shape: models[shape.name])
    table = speed.write(rows, args, tmp_path)
    assert json.loads((tmp_path / "speed.json").read_text())["rows"] == rows
    for shape in shapes.values():
        assert f"### {shape.name}" in table
        for batch in (2,):
            measured = {row["setting"]: row for row in rows if row["shape"] == shape.name and row["batch"] == batch}
            assert set(measured) == {"unpatched", "keep-all (hook cost)"} | {
                setting.label
                for setting in speed.settings(6, measured["unpatched"]["visual_tokens"], args.methods, (0.5,))
            }
            base, keep_all = measured["unpatched"], measured["keep-all (hook cost)"]
            assert base["prefill_speedup"] == base["ttft_speedup"] == base["kv_ratio"] == 1.0
            assert keep_all["kv_bytes"] == base["kv_bytes"] and keep_all["flops_ratio_exact"] == 1.0
            skipped = {label for label, row in measured.items() if "skipped" in row}
            assert skipped == {label for label in measured if label.startswith("holitom")}
            assert all("past the model's 6 decoder layers" in measured[label]["skipped"] for label in skipped)
            for label, row in measured.items():
                if label in skipped:
                    continue
                assert row["vision_ms"] > 0 and row["ttft_ms"] > 0 and row["tpot_ms"] > 0
                if "@" in label:
                    assert row["avg_visual_tokens"] == pytest.approx(row["visual_tokens"] / 2, abs=1)
                    assert row["kv_bytes"] < base["kv_bytes"] and row["flops_ceiling"] > 1.2


def test_questions_grow_by_five_words_from_the_benchmark_question():
    asked = speed.questions(4)
    assert asked[0] == speed.QUESTION
    assert [len(question.split(" ")) for question in asked] == [28, 33, 38, 43]
    assert all(longer.startswith(shorter) for shorter, longer in itertools.pairwise(asked))


def test_speedups_pair_each_round_with_the_unpatched_run_beside_it():
    """Drift between rounds (a slow first half, a fast second) cancels in the per-round ratios, where a ratio of
    medians would report a speedup that is not there."""
    shape = speed.Shape("s", None, None, "image", [])
    grid = [speed.Setting("unpatched"), speed.Setting("keep-all", "fastv", {"ratio": 1.0})]
    times = {"unpatched": [10.0, 10.0, 30.0, 30.0, 30.0], "keep-all": [11.0, 11.0, 11.0, 33.0, 33.0]}
    run = {"ttft_ms": 1.0, "tpot_ms": 1.0, "peak_memory_bytes": None, "kv_bytes": 1}
    generated = {label: [run] for label in times}
    rows = speed._rows(shape, 1, grid, times, dict.fromkeys(times), generated, dict.fromkeys(times, 1.0), 576)
    assert rows[1]["prefill_speedup"] == pytest.approx(10 / 11)  # a ratio of medians would say 30 / 11


def test_no_methods_times_only_the_hooks_cost():
    args = speed.parser().parse_args(["--methods"])
    assert [row.label for row in speed.settings(32, 576, args.methods)] == ["unpatched", "keep-all (hook cost)"]
