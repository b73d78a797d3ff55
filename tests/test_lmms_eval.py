"""The lmms-eval model `mmtoken` and the probe tasks, through lmms-eval's real evaluator (`simple_evaluate`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import model_and_processor
from lmms_eval.evaluator import simple_evaluate
from lmms_eval.tasks import TaskManager
from PIL import Image

from mmtoken.cli import main
from mmtoken.evaluation import probe_tasks
from mmtoken.evaluation.lmms_model import MmtokenModel, read_video
from mmtoken.zoo import ask, embedded, load, probe, world


@pytest.fixture(scope="module")
def manager():
    return TaskManager(verbosity="WARNING", include_path=str(probe_tasks.tasks_path()), include_defaults=False)


def evaluate(model, manager, tasks, limit, **kwargs):
    return simple_evaluate(model=model, tasks=tasks, limit=limit, task_manager=manager, log_samples=True,
                           bootstrap_iters=0, verbosity="WARNING", **kwargs)  # fmt: skip


def docs_in(folder: Path, task: str) -> list[dict]:
    return [json.loads(line) for line in (folder / "data" / f"{task}.jsonl").read_text().splitlines()]


def docs(task: str) -> list[dict]:
    return docs_in(probe_tasks.tasks_path(), task)


def test_task_data_is_the_probe_generator_output_pixel_for_pixel():
    count = docs("count")
    samples = probe.generate("image", n=probe_tasks.PER_TASK["image"], seed=probe_tasks.SEED, task="count")
    for doc, sample in zip(count[:3], samples[:3], strict=True):
        assert (doc["question"], doc["answer"]) == (sample.question, sample.answer)
        assert np.array_equal(np.asarray(Image.open(doc["path"])), np.asarray(sample.images[0]))
    motion = docs("motion")[0]
    video = probe.generate("video", n=probe_tasks.PER_TASK["video"], seed=probe_tasks.SEED, task="motion")[0]
    frames, metadata = read_video(motion["path"], 32)  # the decoder the model uses on any benchmark's video files
    assert metadata.total_num_frames == len(video.video) == len(frames)
    assert np.array_equal(frames, np.stack([np.asarray(frame) for frame in video.video]))
    assert len(count) == probe_tasks.PER_TASK["image"] and len(docs("needle")) == probe_tasks.PER_TASK["video"]
    long = docs("needle_64f")
    needles = probe.generate("video", n=probe_tasks.PER_LONG_TASK, seed=probe_tasks.SEED, task="needle", frames=64)
    assert len(long) == probe_tasks.PER_LONG_TASK and long[0]["answer"] == needles[0].answer
    frames, _ = read_video(long[0]["path"], 128)
    assert np.array_equal(frames, np.stack([np.asarray(frame) for frame in needles[0].video]))  # all 64 frames
    signs = docs("world_read")
    drawn = world.generate("image", n=probe_tasks.WORLD_PER_TASK["image"], seed=probe_tasks.SEED, task="read")
    assert len(signs) == len(drawn) and (signs[0]["question"], signs[0]["answer"]) == (
        drawn[0].question,
        drawn[0].answer,
    )
    assert np.array_equal(np.asarray(Image.open(signs[0]["path"])), np.asarray(drawn[0].images[0]))
    settings = {kind: probe_tasks.WORLD_PER_TASK[kind] * len(world.tasks(kind)) for kind in ("image", "video")}
    assert min(settings.values()) >= 500  # samples per setting, for intervals of about 2 points


def test_model_by_name_through_the_entry_point_on_a_probe_group(manager):
    # the same path as `python -m lmms_eval --model mmtoken --model_args ...`: the name resolves via the entry point
    results = evaluate("mmtoken", manager, ["mmtoken_probe_llava_reliable"], limit=2,
                       model_args="pretrained=probe-llava,method=pdrop,ratio=0.25,device=cpu,batch_size=2")  # fmt: skip
    reliable = [probe_tasks.task_name(task) for task in ("count", "color", "exist")]
    assert set(results["results"]) == {"mmtoken_probe_llava_reliable", *reliable}
    for task in reliable:
        samples = results["samples"][task]
        hits = [sample["filtered_resps"][0] == sample["target"] for sample in samples]
        assert results["results"][task]["exact_match,none"] == pytest.approx(sum(hits) / len(hits))
        for sample in samples:
            stats = sample["token_counts"][0]["mmtoken"]
            assert stats["method"] == "pdrop" and tuple(stats["layers"]) == (1, 2, 4)  # the probe model's defaults
            assert stats["visual_tokens_per_layer"] == [576, 144, 36, 36, 9, 9]
            assert 0 < stats["flops_ratio_exact"] < 0.5 and stats["prefill_ms"] > 0
            assert sample["token_counts"][0]["input_tokens"] > 576


def test_a_budget_the_probes_defaults_cannot_reach_takes_its_low_budget_shape(monkeypatch):
    """On the 6-layer probe, PyramidDrop's default layers (1, 2, 4) keep at least 96 tokens per layer on average:
    at budget 64 the model takes the low-budget shape (here a stand-in), resolved once the model is loaded."""
    monkeypatch.setitem(embedded.LOW_BUDGET_DEFAULTS, "probe-llava", {"pdrop": {"layers": (1, 2, 3)}})
    resolved = []
    for arguments in ({"budget": 64}, {"budget": 192}, {"budget": 64, "layers": "[1,2,5]"}):
        lm = MmtokenModel(pretrained="probe-llava", method="pdrop", device="cpu", **arguments)
        resolved.append((lm.params, lm.handle.method.layers))
        lm.clean()  # the model is loaded once; unpatched for the next
    assert resolved == [
        ({"layers": (1, 2, 3), "budget": 64}, (1, 2, 3)),
        ({"layers": (1, 2, 4), "budget": 192}, (1, 2, 4)),  # the defaults reach it
        ({"layers": (1, 2, 5), "budget": 64}, (1, 2, 5)),  # what the arguments say wins
    ]


def test_unpatched_answers_are_the_reference_prompting_answers(manager):
    lm = MmtokenModel(pretrained="probe-llava", device="cpu", batch_size=2)
    results = evaluate(lm, manager, ["mmtoken_probe_count"], limit=3)
    model, processor = load("probe-llava")
    samples = probe.generate("image", n=probe_tasks.PER_TASK["image"], seed=probe_tasks.SEED, task="count")[:3]
    answers = [sample["filtered_resps"][0] for sample in sorted(results["samples"]["mmtoken_probe_count"],
                                                                 key=lambda sample: sample["doc_id"])]  # fmt: skip
    assert answers == [ask(model, processor, sample) for sample in samples]
    stats = results["samples"]["mmtoken_probe_count"][0]["token_counts"][0]["mmtoken"]
    assert stats["avg_visual_tokens"] == 576 and stats["flops_ratio_exact"] == 1.0


def _row_stats(sample: dict) -> dict:
    """A sample's own stats: without timings and the batch's size and KV bytes."""
    stats = sample["token_counts"][0]["mmtoken"]
    return {
        key: value for key, value in stats.items() if key not in ("prefill_ms", "generate_ms", "batch_size", "kv_bytes")
    }


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision"])
def test_batch_equals_single_rows_on_images_and_videos_from_a_local_folder(manager, family, tmp_path):
    model, processor = model_and_processor(family)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    tasks = ["mmtoken_probe_color", "mmtoken_probe_motion"]
    outputs = {}
    for batch_size in (1, 3):
        lm = MmtokenModel(pretrained=str(tmp_path), method="fastv", k=2, ratio=0.4, device="cpu", dtype="float32",
                          batch_size=batch_size, max_new_tokens=4)  # fmt: skip
        results = evaluate(lm, manager, tasks, limit=3)
        outputs[batch_size] = {
            (task, sample["doc_id"]): (sample["resps"], _row_stats(sample))
            for task in tasks
            for sample in results["samples"][task]
        }
    assert outputs[1] == outputs[3]
    video = outputs[3][("mmtoken_probe_motion", 0)][1]
    assert video["avg_visual_tokens"] < video["original_visual_tokens"]


def test_bad_method_is_refused_before_the_model_loads():
    with pytest.raises(KeyError, match="unknown method"):
        MmtokenModel(pretrained="no/such-model", method="nope")
    with pytest.raises(TypeError, match="unknown parameter"):
        MmtokenModel(pretrained="no/such-model", method="fastv", strength=3)


def test_tasks_path_prints_only_the_folder_it_writes(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MMTOKEN_CACHE", str(tmp_path))
    monkeypatch.setattr(probe_tasks, "PER_TASK", {"image": 2, "video": 1})
    monkeypatch.setattr(probe_tasks, "PER_LONG_TASK", 1)
    monkeypatch.setattr(probe_tasks, "WORLD_PER_TASK", {"image": 1, "video": 1})
    main(["tasks-path"])
    folder = tmp_path / f"lmms-tasks-v{probe_tasks.VERSION}"
    assert capsys.readouterr().out == f"{folder}\n"  # so `--include_path "$(mmtoken tasks-path)"` works
    names = TaskManager(verbosity="WARNING", include_path=str(folder), include_defaults=False).all_tasks
    tasks = [probe_tasks.task_name(task) for kind in ("image", "video") for task in probe.tasks(kind)]
    tasks += [probe_tasks.task_name(task) for task in probe_tasks.LONG_VIDEOS]
    tasks += [probe_tasks.task_name("world_" + task) for kind in ("image", "video") for task in world.tasks(kind)]
    groups = [
        "mmtoken_probe_image",
        "mmtoken_probe_video",
        "mmtoken_probe_world_image",
        "mmtoken_probe_world_video",
        "mmtoken_probe_llava_reliable",
        "mmtoken_probe_qwen2vl_reliable",
    ]
    assert set(names) == {*tasks, *groups}
    suite = (folder / "mmtoken_probe_world_image.yaml").read_text()
    assert "mmtoken_probe_world_relation" in suite and "mmtoken_probe_world_count" not in suite  # counting apart
    kinds = {name: probe_tasks.task_kind(name) for name in tasks}
    assert {kind for name, kind in kinds.items() if "_world_" in name} == {"image", "video"}
    assert kinds["mmtoken_probe_world_exist"] == "image" and kinds["mmtoken_probe_needle_64f"] == "video"
    assert probe_tasks.task_kind("mmtoken_probe_world_needle") == "video" and probe_tasks.task_kind("mme") is None
    assert len(docs_in(folder, "needle")) == 1 and not list(tmp_path.glob("*.partial-*"))


def test_mmtoken_imports_lmms_eval_only_where_it_evaluates():
    code = ("import sys, mmtoken, mmtoken.cli, mmtoken.compare, mmtoken.evaluation.report, mmtoken.evaluation.speed, "
            "mmtoken.evaluation.probe_tasks, mmtoken.evaluation.sweep; print('lmms_eval' in sys.modules)")  # fmt: skip
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


def test_the_readmes_stock_cli_command_writes_its_results_file(tmp_path):
    """lmms-eval exits 0 even when it fails, so the proof is the results file it writes."""
    command = [sys.executable, "-m", "lmms_eval", "--model", "mmtoken",
               "--model_args", "pretrained=probe-llava,method=pdrop,ratio=0.25,device=cpu",
               "--tasks", "mmtoken_probe_count", "--include_path", str(probe_tasks.tasks_path()), "--limit", "2",
               "--output_path", str(tmp_path), "--log_samples"]  # fmt: skip
    subprocess.run(command, capture_output=True, text=True, check=True, timeout=600)
    written = list(tmp_path.rglob("*_results.json"))
    assert len(written) == 1, sorted(path.name for path in tmp_path.rglob("*"))
    results = json.loads(written[0].read_text())["results"]["mmtoken_probe_count"]
    assert 0 <= results["exact_match,none"] <= 1
    assert list(tmp_path.rglob("*_samples_mmtoken_probe_count.jsonl"))
