"""Load runs on the CPU with a tiny model saved to a folder: traces replay exactly, and under torchrun the staged
deployment (the encoder in its own process, over gloo) answers every request as the colocated one does, with static
and with continuous batching (prefills apart or overlapped), its embedding cache hitting on repeated media."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import model_and_processor

from mmtoken.evaluation import serving
from mmtoken.staging.load import arrivals, make_trace, read_trace, write_trace
from mmtoken.staging.metrics import SLO, interference, summarize


def test_arrivals_have_the_asked_rate_and_gamma_is_burstier():
    poisson, gamma = arrivals(4000, 5.0), arrivals(4000, 5.0, "gamma", cv=3.0)
    gaps = [b - a for a, b in itertools.pairwise(gamma)]
    assert abs(len(poisson) / poisson[-1] - 5.0) < 0.3 and abs(len(gamma) / gamma[-1] - 5.0) < 0.6
    mean = sum(gaps) / len(gaps)
    assert (sum((gap - mean) ** 2 for gap in gaps) / len(gaps)) ** 0.5 / mean > 2.0


def test_a_trace_file_replays_the_same_requests_and_bad_rows_say_where(tmp_path):
    trace = make_trace(30, 2.0, {"image": 1, "video": 1}, {"video": 8}, repeat=0.5, seed=3)
    write_trace(trace, tmp_path / "trace.jsonl")
    assert read_trace(tmp_path / "trace.jsonl") == trace
    videos = [row for row in trace if row.kind == "video"]
    assert all(row.count == 8 for row in videos) and len({row.media for row in videos}) < len(videos)
    (tmp_path / "bad.jsonl").write_text('{"at": 0, "kind": "audio", "count": 1, "media": 0, "max_tokens": 4}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: a row needs a kind"):
        read_trace(tmp_path / "bad.jsonl")


def test_slo_attainment_counts_refused_requests_and_goodput_is_over_the_span():
    records = [
        {"at": 0.0, "error": None, "ttft_s": 0.5, "tpot_s": 0.01, "e2e_s": 1.0, "queue_s": 0.1},
        {"at": 1.0, "error": None, "ttft_s": 2.0, "tpot_s": 0.01, "e2e_s": 3.0, "queue_s": 1.5},
        {"at": 2.0, "error": "refused"},
    ]
    summary = summarize(records, SLO(ttft_s=1.0, tpot_s=0.05))
    assert summary["slo_attainment"] == 1 / 3 and summary["goodput_rps"] == 1 / 4.0
    assert (summary["answered"], summary["refused"], summary["failed"]) == (2, 1, 0)


def test_interference_sets_the_steps_during_a_videos_encode_and_prefill_apart():
    steady = [1.0, 1.02, 1.04, 1.06, 1.08, 1.1]  # an image's tokens every 20 ms ...
    slowed = [1.2, 1.3, 1.4, 1.5, 1.6]  # ... every 100 ms while the video's batch runs, from 1.1 s to 1.6 s ...
    records = [
        {"at": 1.0, "kind": "video", "queue_s": 0.1, "ttft_s": 0.6, "token_offsets_s": [0.6, 0.62]},
        {"at": 0.0, "kind": "image", "queue_s": 0.0, "ttft_s": 1.0, "token_offsets_s": steady + slowed + [1.62, 1.64]},
    ]  # ... and every 20 ms again after its first token
    measured = interference(records)
    assert (measured["steps_during_heavy"], measured["steps_quiet"]) == (5, 8)  # the video's own step is quiet
    assert measured["step_p99_during_heavy_s"] == pytest.approx(0.1)
    assert measured["step_p99_quiet_s"] == pytest.approx(0.02)
    assert measured["step_rise"] == pytest.approx(5.0)


def _loadtest(folder: Path, processes: int, *options: str) -> dict:
    """`mmtoken loadtest` of the tiny LLaVA, saved to `folder`, under torchrun with `processes` processes on the CPU;
    its serving.json, every request answered."""
    model, processor = model_and_processor("llava")
    model.save_pretrained(folder / "model")
    processor.save_pretrained(folder / "model")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
               "-m", "mmtoken", "loadtest", str(folder / "model"), "--count", "8", "--mix", "image=1,images=1",
               "--counts", "images=2", "--max-tokens", "4", "--out", str(folder / "out"), *options]  # fmt: skip
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((folder / "out" / "serving.json").read_text())
    failed = [(row["deployment"], row["method"], row["batching"], record["error"]) for row in result["rows"]
              for record in row["records"] if record["error"]]  # fmt: skip
    assert not failed, failed
    return result


def test_staged_over_gloo_answers_as_colocated_and_its_cache_hits_on_repeated_media(tmp_path):
    rows = _loadtest(tmp_path, 2, "--deployments", "colocated", "threaded", "staged", "staged-cache", "--methods",
                     "none", "fastv:ratio=0.5", "--rates", "20", "--repeat", "0.6", "--batching", "static",
                     "continuous", "overlapped")["rows"]  # fmt: skip
    out = tmp_path / "out"
    assert [(row["deployment"], row["method"], row["batching"]) for row in rows] == [
        (deployment, method, batching) for deployment in ("colocated", "threaded", "staged", "staged-cache")
        for method in ("unpatched", "fastv:ratio=0.5") for batching in ("static", "continuous", "overlapped")
    ]  # fmt: skip
    for row in rows:
        assert row["answered"] == row["requests"] == 8 and row["steps_quiet"] + row["steps_during_heavy"] > 0
    for method in ("unpatched", "fastv:ratio=0.5"):
        answers = [[record["tokens"] for record in row["records"]] for row in rows if row["method"] == method]
        assert all(answer == answers[0] for answer in answers)  # every deployment, every batching
    hits = {row["deployment"]: [record["cache_hit"] for record in row["records"]] for row in rows
            if row["batching"] == "static"}  # fmt: skip
    assert set(hits["colocated"]) == {None} and set(hits["staged"]) == {None}
    trace = read_trace(out / "trace-20.jsonl")
    repeated = [len({row.media for row in trace if row.kind == kind}) < sum(row.kind == kind for row in trace)
                for kind in ("image", "images")]  # fmt: skip
    assert any(repeated) and hits["staged-cache"].count(True) >= 1 and hits["staged-cache"][0] is False
    assert (out / "serving.png").stat().st_size > 0 and "| staged-cache | unpatched | overlapped | 20 | 8 / 8 |" in (
        out / "serving.md").read_text()  # fmt: skip


def test_two_encoder_processes_share_the_requests_and_their_images_and_answer_as_colocated(tmp_path):
    """Unpatched and VisionZip (which reads the tower's attention of every part): a two-image prompt goes out to
    both encoders in two parts, and every answer is colocated's."""
    result = _loadtest(tmp_path, 3, "--deployments", "colocated", "staged", "--methods", "none", "visionzip:ratio=0.5",
                       "--rates", "40", "--batching", "continuous")  # fmt: skip
    assert result["environment"]["encoders"] == 2
    rows = {(row["deployment"], row["method"]): row["records"] for row in result["rows"]}
    for method in ("unpatched", "visionzip:ratio=0.5"):
        colocated, staged = ([record["tokens"] for record in rows[deployment, method]]
                             for deployment in ("colocated", "staged"))  # fmt: skip
        assert staged == colocated and all(tokens for tokens in staged)
        parts = [record["encoder"] for record in rows["staged", method]]
        images = [ranks for ranks, record in zip(parts, rows["staged", method], strict=True)
                  if record["kind"] == "images"]  # fmt: skip
        assert images and all(len(ranks) == 2 for ranks in images)  # a two-image prompt went out in two parts
        assert {rank for ranks in parts for rank in ranks} == {0, 1}
        assert {record["encoder"] for record in rows["colocated", method]} == {None}


def test_loadtest_refuses_a_method_continuous_batching_cannot_take_before_any_work(tmp_path):
    with pytest.raises(SystemExit, match=r"h2o.*h2o"):
        serving.main(["probe-llava", "--methods", "h2o", "--batching", "static", "continuous", "--out",
                      str(tmp_path / "out")])  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_loadtest_refuses_a_method_chunked_prefill_cannot_take_before_any_request(tmp_path):
    with pytest.raises(SystemExit, match=r"fastv:ratio=0.5: chunked prefill .* fastv cuts"):
        serving.main(["probe-llava", "--methods", "none", "fastv:ratio=0.5", "--batching", "chunked", "--out",
                      str(tmp_path / "out")])  # fmt: skip
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit, match="--chunk-tokens must be >= 1"):
        serving.main(["probe-llava", "--batching", "chunked", "--chunk-tokens", "0", "--out", str(tmp_path / "out")])
