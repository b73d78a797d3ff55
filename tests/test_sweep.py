"""`mmtoken sweep` killed midway resumes with the missing cells only; `mmtoken report` tables and plots its rows."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mmtoken.evaluation import calibration, report, sweep

CONFIG = {
    "models": [{"pretrained": "probe-llava", "device": "cpu", "dtype": "float32", "batch_size": 2}],
    "methods": {"none": {}, "random": {}, "uniform": {}, "fastv": {}, "kv 50%": {"method": "kvrandom", "ratio": 0.5}},
    "budgets": [192, 64],
    "tasks": ["mmtoken_probe_count"],
    "limit": 2,
}
CELLS = 1 + 3 * 2 + 1  # the KV press runs once: it keeps a share of the cache, not a budget


def _run(config: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mmtoken", "sweep", str(config)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> Path:
    """A sweep killed (SIGKILL) right after its first row, then run again to the end; its results file."""
    folder = tmp_path_factory.mktemp("sweep")
    output, config = folder / "results.jsonl", folder / "sweep.yaml"
    config.write_text(yaml.safe_dump({**CONFIG, "output": str(output)}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", "OMP_NUM_THREADS": "1"}  # as conftest
    first = _run(config, env)
    deadline = time.monotonic() + 300
    while not (output.exists() and output.read_text().endswith("\n")):
        assert first.poll() is None, first.stdout.read()
        assert time.monotonic() < deadline, "the sweep wrote no row in 5 minutes"
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    before = _rows(output)
    assert 1 <= len(before) < CELLS, "the kill came after the sweep had finished: nothing left to resume"
    second = _run(config, env)
    log, _ = second.communicate(timeout=600)
    assert second.returncode == 0, log
    ran = [line.removeprefix("done: ").strip() for line in log.splitlines() if line.startswith("done: ")]
    cells = sweep.cells(sweep.load_config(config))
    done_first = {row["key"] for row in before}
    assert ran == [cell.label for cell in cells if cell.key not in done_first], log  # only the missing cells ran
    after = _rows(output)
    assert after[: len(before)] == before  # rows of the first run untouched
    assert sorted(row["key"] for row in after) == sorted(cell.key for cell in cells)
    return output


def test_killed_sweep_resumes_with_the_missing_cells_only(swept):
    rows = _rows(swept)
    assert len({row["key"] for row in rows}) == len(rows) == CELLS
    by_setting = {(row["method"], row["budget"]): row for row in rows}
    assert by_setting[("none", None)]["avg_visual_tokens"] == 576
    assert by_setting[("random", 64)]["avg_visual_tokens"] == 64
    assert "unreachable" in by_setting[("fastv", 64)]["skipped"]  # K=1 of 6 layers cannot average 64
    assert by_setting[("fastv", 192)]["params"] == {"k": 1, "budget": 192}  # the probe model's default K


def test_report_tables_and_plots(swept, tmp_path):
    markdown = tmp_path / "RESULTS.md"
    text = report.report([swept], markdown, tmp_path / "figures", "mmtoken report x")
    table = text.split("### probe-llava")[1].split("\n\n")[1]  # the first table, not the calibration's
    lines = [line.split(" | ") for line in table.splitlines() if line.startswith("| ")]
    header, rows = lines[0], {(line[0].strip("| "), line[1]): line for line in lines[1:]}
    unpatched = rows[("unpatched", "-")]
    assert unpatched[header.index("vs unpatched % ± 95%")] == "100.0"
    assert unpatched[header.index("FLOPs % paper / exact")] == "100.0 / 100.0"
    random64 = {row["method"]: row for row in _rows(swept) if row["budget"] == 64}["random"]
    score = random64["metrics"]["mmtoken_probe_count"]["exact_match"]
    assert rows[("random", "64")][header.index("count %")] == f"{100 * score:.1f}"
    assert f"{100 * random64['flops_ratio_exact']:.1f}" in rows[("random", "64")][header.index("FLOPs % paper / exact")]
    assert rows[("fastv", "64")][2].startswith("unreachable")
    assert unpatched[header.index("KV %")] == "100.0" and rows[("random", "64")][header.index("KV %")] != "-"
    pressed = rows[("kv 50%", "-")]
    assert (
        float(pressed[header.index("KV %")]) < 100 and pressed[header.index("FLOPs % paper / exact")] == "100.0 / 100.0"
    )
    # the interval of 2 samples of one task: Agresti-Coull's adjusted accuracy, 1.96 of its standard error
    adjusted = (score * 2 + 2) / 6
    assert rows[("random", "64")][header.index("mean ± 95%")] == (
        f"{100 * score:.1f} ± {100 * 1.96 * (adjusted * (1 - adjusted) / 6) ** 0.5:.1f}")  # fmt: skip
    # a LLaVA-1.5-format probe is calibrated against the published LLaVA-1.5-7B numbers of what it measured
    relative = rows[("random", "64")][header.index("vs unpatched % ± 95%")].split(" ± ")[0]
    calibrated = [line for line in text.split("Calibration of probe-llava")[1].splitlines()
                  if line.startswith("| random | 64 (11.1%) | ")]  # fmt: skip
    assert len(calibrated) == 1 and calibrated[0].split(" | ")[2].startswith(relative + " ± ")
    assert f"| 89.1 | {89.1 - float(relative):+.1f} | Wen |" in calibrated[0]
    assert "- Budget 64: 1 methods, mean |gap|" in text and "too few methods for a rank correlation" in text
    for name in ("flops", "prefill"):
        figure = tmp_path / "figures" / f"probe-llava-{name}.png"
        assert figure.stat().st_size > 10_000
        assert f"](figures/probe-llava-{name}.png)" in text


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"method": {}}, "unknown key"),
        ({"methods": {"nope": {}}}, "unknown method"),
        ({"methods": {"fastv": {"strength": 1}}}, "unknown parameter"),
        ({"models": [{"pretrained": "probe-llava", "gpu": 1}]}, "takes only"),
        ({"budgets": [-5]}, "budget must be a positive"),
    ],
)
def test_bad_config_is_refused_before_any_cell(tmp_path, change, message):
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({**CONFIG, "output": str(tmp_path / "out.jsonl"), **change}))
    with pytest.raises((ValueError, KeyError, TypeError), match=message):
        sweep.sweep(config)
    assert not (tmp_path / "out.jsonl").exists()


def test_report_names_the_methods_that_lose_to_a_simple_baseline():
    entries = [
        {"method": "random", "budget": 64, "mean": 0.5},
        {"method": "uniform", "budget": 64, "mean": 0.6},
        {"method": "fastv", "budget": 64, "mean": 0.55},
        {"method": "pdrop", "budget": 64, "mean": 0.7},
        {"method": "fastv", "budget": 192, "mean": 0.9},
        {"method": "pooling", "budget": 192, "mean": 0.8},
        {"method": "pdrop", "budget": 192, "skipped": "unreachable"},
    ]
    assert report.against_baselines(entries, 100).splitlines() == [
        "- Budget 192: the best simple baseline is pooling (mean 80.0); every method scores at least as well.",
        "- Budget 64: the best simple baseline is uniform (mean 60.0); fastv score below it.",
    ]


def test_a_data_parallel_sweep_gives_the_rows_of_one_process(tmp_path):
    """Two processes on the CPU (torchrun; `accelerate launch --num_processes N` on GPUs) each answer half of every
    cell's samples; lmms-eval gathers them, so the rows' metrics are one process's."""
    config = {**CONFIG, "methods": {"none": {}, "fastv": {}}, "budgets": [128],
              "tasks": ["mmtoken_probe_count", "mmtoken_probe_color"], "limit": 6}  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    rows = {}
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    for name, launcher in (("one", []), ("two", torchrun)):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({**config, "output": str(tmp_path / f"{name}.jsonl")}))
        command = [sys.executable, *launcher, "-m", "mmtoken", "sweep", str(path)]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        rows[name] = {row["key"]: row for row in _rows(tmp_path / f"{name}.jsonl")}
    assert rows["one"].keys() == rows["two"].keys() and len(rows["one"]) == 4
    for key, row in rows["one"].items():
        assert (rows["two"][key]["metrics"], rows["two"][key]["samples"]) == (row["metrics"], row["samples"])


def test_world_tables_weigh_the_suite_groups_alike_and_leave_counting_apart():
    names = {task: f"mmtoken_probe_world_{task}" for task in ("exist", "shape", "color", "read", "count")}
    weights = report.task_weights(list(names.values()))
    # perception (exist, shape), attributes (color) and reading (read) count a third each; count not at all
    assert weights == pytest.approx({names["exist"]: 1 / 6, names["shape"]: 1 / 6, names["color"]: 1 / 3,
                                     names["read"]: 1 / 3})  # fmt: skip
    assert report.task_weights(["mmtoken_probe_count", "mmtoken_probe_color"]) == {
        "mmtoken_probe_count": 0.5, "mmtoken_probe_color": 0.5}  # fmt: skip
    scores = {names["exist"]: 1.0, names["shape"]: 0.5, names["color"]: 0.9, names["read"]: 0.6, names["count"]: 0.0}
    unpatched = {"method": "none", "scores": dict.fromkeys(names.values(), 1.0),
                 "task_samples": dict.fromkeys(names.values(), 60)}  # fmt: skip
    pruned = {"method": "fastv", "scores": scores, "task_samples": dict.fromkeys(names.values(), 60)}
    report._add_relative([unpatched, pruned])
    expected = (1.0 + 0.5) / 6 + 0.9 / 3 + 0.6 / 3
    assert pruned["mean"] == pytest.approx(expected) and pruned["relative"] == pytest.approx(100 * expected)
    assert 0 < pruned["mean_interval"] < 0.1 and pruned["relative_interval"] > 100 * pruned["mean_interval"]


def test_videos_calibrate_against_onevision_by_the_share_of_tokens_kept():
    def entry(method, budget, relative, task="mmtoken_probe_order", original=256):
        return {"method": method, "budget": budget, "relative": relative, "relative_interval": 3.0,
                "original_visual_tokens": original, "scores": {task: 0.5}}  # fmt: skip

    entries = [entry("holitom", 25.6, 60.0), entry("visionzip", 25.6, 80.0), entry("fastv", 25.6, 70.0),
               entry("holitom", 64, 90.0), entry("random", 25.6, 99.0)]  # fmt: skip
    assert report._calibration_reference(entries) == "video"
    name, published = calibration.REFERENCES["video"]
    rows = calibration.compare(entries, published)
    # 25.6 of 256 tokens is the published 10%; 64 of 256 (25%) and random have no published number
    assert {(row["method"], row["budget"]) for row in rows} == {("holitom", 25.6), ("visionzip", 25.6), ("fastv", 25.6)}
    holitom = next(row for row in rows if row["method"] == "holitom")
    assert holitom["published"] == 98.3 and holitom["gap"] == pytest.approx(38.3) and holitom["share"] == 0.1
    text = calibration.markdown("probe-qwen2vl", rows, name)
    assert "| holitom | 25.6 (10%) | 60.0 ± 3.0 | 98.3 | +38.3 | Unified |" in text
    assert "- Budget 25.6: 3 methods, mean |gap| 23.4 points; Spearman rho -0.50" in text
    images = [entry("fastv", 192, 80.0, "mmtoken_probe_count", 576)]
    assert report._calibration_reference(images) == "image"
    assert report._calibration_reference([entry("fastv", 48, 80.0, "mmtoken_probe_count", 144)]) is None
    assert report._calibration_reference([*images, *entries]) is None  # a table of images and videos


def test_spearman_ranks_ties_and_counts_every_ordering_for_its_p_value():
    assert calibration.ranks([3.0, 1.0, 3.0, 2.0]) == [3.5, 1.0, 3.5, 2.0]
    rho, p = calibration.spearman([1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0])
    assert rho == pytest.approx(1.0) and p == pytest.approx(2 / 24)  # the order and its reverse, of 4! orderings
    rho, _ = calibration.spearman([1.0, 2.0, 3.0, 4.0, 5.0], [5.0, 6.0, 7.0, 8.0, 1.0])
    assert rho == pytest.approx(0.0)
    assert calibration.spearman([1.0, 2.0], [2.0, 1.0]) is None
