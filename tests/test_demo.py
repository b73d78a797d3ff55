"""The Gradio comparison app: `mmtoken demo` served as a user starts it, its `compare` API through gradio_client,
the lock that keeps requests apart on one model, bad input, and the page in Debian's chromium through playwright."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from playwright.sync_api import expect, sync_playwright

from mmtoken.demos.comparison import Comparer
from mmtoken.demos.media import MAX_BYTES, MAX_FRAMES, read_media, write_probe_example
from mmtoken.zoo import ask, load, probe
from mmtoken.zoo.tiny import tiny_model

OUTPUT = Path(__file__).resolve().parents[1] / "test-output"
METHODS = [
    {"method": "fastv", "budget": 128, "k": 1},
    {"method": "pdrop", "budget": 128, "layers": [1, 2, 4]},
    {"method": "uniform", "budget": 64},
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    """`mmtoken demo` in its own process; it must answer within 60 s of starting."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    OUTPUT.mkdir(exist_ok=True)
    log = (OUTPUT / "demo-server.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "mmtoken", "demo", "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    started = time.monotonic()
    while time.monotonic() - started < 60:
        assert process.poll() is None, f"mmtoken demo exited; see {log.name}"
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    else:
        process.kill()
        pytest.fail("mmtoken demo did not serve within 60 s")
    yield url
    process.terminate()
    process.wait(timeout=30)
    log.close()


@pytest.fixture(scope="module")
def client(server):
    return Client(server, verbose=False)


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """A probe image question, as a file the way a user would upload it."""
    return write_probe_example("image: count", 1, tmp_path_factory.mktemp("probe"))


def _compare(client: Client, file: Path, question: str, methods: list[dict], model: str = "probe-llava") -> dict:
    return client.predict(model, handle_file(str(file)), question, methods, 8, api_name="/compare")


@pytest.fixture(scope="module")
def result(client, example):
    file, question, _ = example
    return _compare(client, file, question, METHODS)


def test_compare_api_returns_the_numbers_of_each_column(result, example):
    columns = result["columns"]
    assert [column["method"] for column in columns] == [{"method": "unpatched"}, *METHODS]
    model, processor = load("probe-llava")
    sample = probe.generate("image", n=1, seed=1, task="count")[0]
    assert columns[0]["answer"] == ask(model, processor, sample, max_new_tokens=8)
    unpatched = columns[0]
    assert unpatched["avg_visual_tokens"] == unpatched["original_visual_tokens"] == 576
    assert unpatched["flops_ratio_paper"] == unpatched["flops_ratio_exact"] == 1
    for column, method in zip(columns[1:], METHODS, strict=True):
        assert abs(column["avg_visual_tokens"] - method["budget"]) < 1
        assert column["flops_ratio_exact"] < 1 and column["kv_bytes"] < unpatched["kv_bytes"]
    for column in columns:
        assert 0 < column["prefill_seconds"] <= column["ttft_seconds"]
        per_layer = column["visual_tokens_per_layer"]
        assert len(per_layer) == model.config.text_config.num_hidden_layers
        for layer, tokens in column["alive"].items():
            assert len(tokens) == per_layer[int(layer)]
    assert sorted(map(tuple, unpatched["alive"]["0"])) == [(0, 0, r, c) for r in range(24) for c in range(24)]


def test_concurrent_requests_on_one_model_match_requests_alone(client, example, result):
    """Requests queued at once through the API give the numbers each gives alone."""
    file, question, _ = example
    jobs = [client.submit("probe-llava", handle_file(str(file)), question, [method], 8, api_name="/compare")
            for method in METHODS]  # fmt: skip
    for job, method, alone in zip(jobs, METHODS, result["columns"][1:], strict=True):
        (_, column) = job.result(timeout=120)["columns"]
        assert column["method"] == method
        assert column["answer"] == alone["answer"] and column["alive"] == alone["alive"]
        assert column["visual_tokens_per_layer"] == alone["visual_tokens_per_layer"]


def test_lock_keeps_each_patch_to_its_own_request(example):
    """Threads sharing one Comparer (one model) get their own method's tokens and leave the model unpatched;
    without the lock a second patch on the shared model is refused or runs under the first."""
    file, question, _ = example
    comparer = Comparer("probe-llava")
    alone = [comparer.compare("probe-llava", file, question, [method]) for method in METHODS]
    results: list[dict | Exception] = [None] * len(METHODS)

    def request(index: int) -> None:
        try:
            results[index] = comparer.compare("probe-llava", file, question, [METHODS[index]])
        except Exception as error:
            results[index] = error

    threads = [threading.Thread(target=request, args=(index,)) for index in range(len(results))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index, got in enumerate(results):
        expected = alone[index]["columns"][1]
        assert not isinstance(got, Exception), got
        assert got["columns"][1]["alive"] == expected["alive"] and got["columns"][1]["answer"] == expected["answer"]
    model = comparer._loaded[0]
    assert not hasattr(model, "_mmtoken_handle") and not model._forward_pre_hooks


@pytest.mark.parametrize(
    "change, message",
    [
        ({"question": "   "}, "type a question"),
        ({"methods": [{"method": "nope", "budget": 64}]}, "unknown method 'nope'"),
        ({"methods": [{"method": "fastv", "budget": 64, "k": 9}]}, "past the model's 6 decoder layers"),
        ({"model": "/no/such/model"}, "could not load model '/no/such/model'"),
        ({"file": "text"}, "neither an image nor a video"),
        ({"file": "large"}, "the limit is 20 MiB"),
    ],
)
def test_bad_input_is_a_clear_message_and_the_app_keeps_serving(client, example, result, tmp_path, change, message):
    file, question, _ = example
    if change.get("file") == "text":
        file = tmp_path / "notes.png"
        file.write_text("not an image")
    elif change.get("file") == "large":
        file = tmp_path / "large.png"
        with file.open("wb") as handle:
            handle.truncate(MAX_BYTES + 1)
    arguments = {"question": question, "methods": METHODS[:1], "model": "probe-llava", **change}
    with pytest.raises(Exception, match=message):
        _compare(client, file, arguments["question"], arguments["methods"], arguments["model"])
    again = _compare(client, example[0], question, METHODS[:1])
    assert again["columns"][1]["alive"] == result["columns"][1]["alive"]


def test_local_model_folder_and_a_video(client, tmp_path):
    """A model given as a local folder (a tiny random Qwen2-VL) answers a probe video; the overlay data covers
    every frame of the grid."""
    model, processor = tiny_model("qwen2_vl")
    model.save_pretrained(tmp_path / "qwen")
    processor.save_pretrained(tmp_path / "qwen")
    file, question, _ = write_probe_example("video: motion", 2, tmp_path)
    got = _compare(client, file, question, [{"method": "random", "budget": 16}], model=str(tmp_path / "qwen"))
    assert got["kind"] == "video"
    full, pruned = got["columns"][0]["alive"]["0"], got["columns"][1]["alive"]["0"]
    assert len({frame for _, frame, _, _ in full}) == 4  # 8 frames, two per temporal patch
    assert len(pruned) == 16 and {tuple(token) for token in pruned} <= {tuple(token) for token in full}
    with pytest.raises(Exception, match="takes images, not videos"):
        _compare(client, file, question, [])


def test_media_reads_a_video_container_and_samples_long_videos(tmp_path):
    import av
    import numpy as np
    from PIL import Image

    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height = 64, 48
        for index in range(40):
            pixels = np.full((48, 64, 3), index * 6, dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    video = read_media(path)
    assert video.kind == "video" and len(video.frames) == MAX_FRAMES and video.frames[0].size == (64, 48)
    brightness = [np.asarray(frame).mean() for frame in video.frames]
    assert brightness == sorted(brightness) and brightness[-1] > brightness[0] + 100
    Image.new("RGB", (20, 10), "red").save(tmp_path / "still.gif")
    assert read_media(tmp_path / "still.gif").kind == "image"


def test_page_in_chromium_compares_and_draws(server, example, result):
    """Upload a probe image in the real page, compare, and see the same answers, the charts and the overlays."""
    file, question, _ = example
    OUTPUT.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1600, "height": 1200})
        page.goto(server)
        page.locator("#media input[type=file]").set_input_files(str(file))
        page.locator("#question textarea").fill(question)
        page.locator("#compare").click()
        for index, column in enumerate(result["columns"]):
            expect(page.locator(f"#answer-{index} textarea")).to_have_value(column["answer"], timeout=90_000)
            expect(page.locator(f"#chart-{index} img")).to_be_visible()
            expect(page.locator(f"#overlay-{index} img")).to_be_visible()
        expect(page.locator("#metrics-1")).to_contain_text("FLOPs")
        expect(page.locator(f"#answer-{len(result['columns'])}")).to_be_hidden()
        page.screenshot(path=OUTPUT / "demo.png", full_page=True)
        page.locator("#question textarea").fill("")
        page.locator("#compare").click()
        expect(page.get_by_text("type a question about the image or video").first).to_be_visible(timeout=30_000)
        expect(page.locator("#answer-0 textarea")).to_have_value(result["columns"][0]["answer"])
        page.locator("#use-example").click()
        expect(page.locator("#question textarea")).to_have_value(question, timeout=30_000)
        expect(page.get_by_text(f"true answer: {example[2]}")).to_be_visible()
        browser.close()
    assert (OUTPUT / "demo.png").stat().st_size > 10_000
