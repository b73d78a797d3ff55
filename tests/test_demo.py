"""The Gradio comparison app: `mmtoken demo` served as a user starts it, its `compare` API through gradio_client,
the lock that keeps requests apart on one model, bad and hostile input, and the page in Debian's chromium through
playwright."""

from __future__ import annotations

import contextlib
import http.server
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import av
import httpx
import numpy as np
import pytest
from gradio_client import Client, handle_file
from PIL import Image
from playwright.sync_api import expect, sync_playwright

from mmtoken.demos.comparison import Comparer
from mmtoken.demos.media import MAX_BYTES, MAX_VIDEO_FRAMES, read_media, sampled_frames, write_probe_example
from mmtoken.zoo import ask, load, probe
from mmtoken.zoo.tiny import tiny_model

OUTPUT = Path(__file__).resolve().parents[1] / "test-output"
UNCACHED = "org/not-cached"  # a hub id named at launch that is in no cache
EMBEDDED = ["probe-llava", "probe-qwen2vl"]
METHODS = [
    {"method": "fastv", "budget": 128, "k": 1},
    {"method": "pdrop", "budget": 128, "layers": [1, 2, 4]},
    {"method": "uniform", "budget": 64},
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def _hub() -> Iterator[tuple[str, list[str]]]:
    """A stand-in for the Hugging Face hub (for HF_ENDPOINT) that has no models: its URL and the paths asked of it."""
    asked = []

    class Hub(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            self.send_error(404)

        do_HEAD = do_GET

        def log_message(self, *_) -> None:
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub) as hub:
        threading.Thread(target=hub.serve_forever, daemon=True).start()
        try:
            yield f"http://127.0.0.1:{hub.server_address[1]}", asked
        finally:
            hub.shutdown()


@contextlib.contextmanager
def _demo(arguments: list[str], hub: str, folder: Path, log_name: str) -> Iterator[str]:
    """`mmtoken demo ARGUMENTS` in its own process, not told offline by the environment, with HF_ENDPOINT at `hub`,
    an empty hub cache and Gradio's files under `folder`; its URL once it serves (within 60 s)."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    OUTPUT.mkdir(exist_ok=True)
    environment = {name: value for name, value in os.environ.items() if name != "HF_HUB_OFFLINE"}
    environment |= {"HF_ENDPOINT": hub, "HF_HOME": str(folder / "hf"), "GRADIO_TEMP_DIR": str(folder / "gradio"),
                    "GRADIO_ANALYTICS_ENABLED": "False"}  # fmt: skip
    with (OUTPUT / log_name).open("w") as log:
        process = subprocess.Popen([sys.executable, "-m", "mmtoken", "demo", "--port", str(port), *arguments],
                                   stdout=log, stderr=subprocess.STDOUT, env=environment)  # fmt: skip
        try:
            started = time.monotonic()
            while time.monotonic() - started < 60:
                assert process.poll() is None, f"mmtoken demo exited; see {log.name}"
                try:
                    urllib.request.urlopen(url, timeout=2)
                    break
                except OSError:
                    time.sleep(0.5)
            else:
                pytest.fail("mmtoken demo did not serve within 60 s")
            yield url
        finally:
            process.terminate()
            process.wait(timeout=30)


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory) -> Path:
    """A tiny random Qwen2-VL saved as a local model folder."""
    folder = tmp_path_factory.mktemp("tiny") / "qwen"
    model, processor = tiny_model("qwen2_vl")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def hub():
    with _hub() as recording:
        yield recording


@pytest.fixture(scope="module")
def server_folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("server")


@pytest.fixture(scope="module")
def server(hub, server_folder, tiny_qwen):
    """`mmtoken demo --models TINY_QWEN_FOLDER org/not-cached`, as a user starts it."""
    with _demo(["--models", str(tiny_qwen), UNCACHED], hub[0], server_folder, "demo-server.log") as url:
        yield url


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
    comparer = Comparer(["probe-llava"])
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


def _alone(name: str) -> tuple[str, int]:
    """What an embedded model answers to the probe example on its own (through `mmtoken.zoo.ask`), and the
    visual tokens the example takes in it (both models answer it right, so these tell them apart)."""
    sample = probe.generate("image", n=1, seed=1, task="count")[0]
    return ask(*load(name), sample, max_new_tokens=8), {"probe-llava": 576, "probe-qwen2vl": 144}[name]


def _answer(result: dict) -> tuple[str, int]:
    unpatched = result["columns"][0]
    return unpatched["answer"], unpatched["original_visual_tokens"]


def test_a_model_change_waits_for_the_running_request(example):
    """A request for another model, made while one runs, loads it only after the running one is done: every
    forward pass of the running request sees its own model loaded, and each answers as its model does alone."""
    file, question, _ = example
    comparer = Comparer(EMBEDDED)
    generating, loaded_at_each_step = threading.Event(), []

    def note_the_loaded_model(*_) -> None:
        loaded_at_each_step.append(comparer._name)
        generating.set()

    hook = comparer._loaded[0].register_forward_pre_hook(note_the_loaded_model)
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(comparer.compare, "probe-llava", file, question, METHODS)
        generating.wait(timeout=60)
        change = pool.submit(comparer.compare, "probe-qwen2vl", file, question, [])
        first, second = running.result(), change.result()
    hook.remove()
    assert len(loaded_at_each_step) > len(METHODS) and set(loaded_at_each_step) == {"probe-llava"}
    assert [_answer(first), _answer(second)] == [_alone("probe-llava"), _alone("probe-qwen2vl")]


def test_api_requests_on_two_models_at_once_get_their_own_model(client, example):
    file, question, _ = example
    order = [*EMBEDDED, *EMBEDDED]
    jobs = [client.submit(name, handle_file(str(file)), question, [], 8, api_name="/compare") for name in order]
    assert [_answer(job.result(timeout=120)) for job in jobs] == [_alone(name) for name in order]


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    """A 20000x10000 one-bit PNG: 200 megapixels in a few kilobytes, past Pillow's decompression bomb limit."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    Image.new("1", (20_000, 10_000)).save(path)
    return path


@pytest.mark.parametrize(
    "change, message",
    [
        ({"question": "   "}, "type a question"),
        ({"methods": [{"method": "nope", "budget": 64}]}, "unknown method 'nope'"),
        ({"methods": [{"method": "fastv", "budget": 64, "k": 9}]}, "past the model's 6 decoder layers"),
        ({"model": "/no/such/model"}, "not in the list of choices"),
        ({"file": "text"}, "neither an image nor a video"),
        ({"file": "large"}, "exceeds the maximum file size of 20971520 bytes"),
        ({"file": "bomb"}, "bomb.png is an image of over 179 megapixels; the limit is 89 megapixels"),
    ],
)
def test_bad_input_is_a_clear_message_and_the_app_keeps_serving(
    client, example, result, bomb, tmp_path, change, message
):
    file, question, _ = example
    if change.get("file") == "text":
        file = tmp_path / "notes.png"
        file.write_text("not an image")
    elif change.get("file") == "large":
        file = tmp_path / "large.png"
        with file.open("wb") as handle:
            handle.truncate(MAX_BYTES + 1)
    elif change.get("file") == "bomb":
        file = bomb
    arguments = {"question": question, "methods": METHODS[:1], "model": "probe-llava", **change}
    with pytest.raises(Exception, match=message):
        _compare(client, file, arguments["question"], arguments["methods"], arguments["model"])
    again = _compare(client, example[0], question, METHODS[:1])
    assert again["columns"][1]["alive"] == result["columns"][1]["alive"]


def test_an_upload_over_the_limit_is_refused_before_it_is_stored(client, server_folder, tmp_path):
    """A 25 MiB upload straight to Gradio's upload route (no client-side check) is refused with 413 and leaves
    nothing in Gradio's folders."""
    uploads = server_folder / "gradio"
    before = set(uploads.rglob("*"))
    large = tmp_path / "large.mp4"
    with large.open("wb") as handle:
        handle.truncate(25 * 2**20)
    with large.open("rb") as handle:
        response = httpx.post(client.upload_url, files=[("files", ("large.mp4", handle))], timeout=60)
    assert response.status_code == 413, response.text
    assert set(uploads.rglob("*")) == before


def test_only_the_models_named_at_launch_load(client, tiny_qwen, example, tmp_path):
    """The model box lists the embedded models and those of --models; a folder not named, even a loadable one,
    is refused by the page and by the Comparer before anything loads."""
    (box,) = [c for c in client.config["components"] if c["props"].get("label", "").startswith("model")]
    assert [value for _, value in box["props"]["choices"]] == [*EMBEDDED, str(tiny_qwen), UNCACHED]
    assert not box["props"]["allow_custom_value"]
    other = shutil.copytree(tiny_qwen, tmp_path / "other")
    file, question, _ = example
    with pytest.raises(Exception, match="not in the list of choices"):
        _compare(client, file, question, [], model=str(other))
    comparer = Comparer(["probe-llava"])
    with pytest.raises(ValueError, match=re.escape(f"'{other}' is not a model this demo serves: probe-llava")):
        comparer.compare(str(other), file, question, [])
    assert comparer._name == "probe-llava"


def test_hub_ids_load_offline_unless_online(client, hub, example, tmp_path):
    """Without --online a hub id named at launch is looked for in the local cache only: a clear message, and
    the hub is never asked (the server's environment does not set HF_HUB_OFFLINE); with --online it is asked."""
    file, question, _ = example
    with pytest.raises(Exception, match=r"could not load model 'org/not-cached' \(offline: .* --online"):
        _compare(client, file, question, [], model=UNCACHED)
    assert hub[1] == []
    with (
        _hub() as (url, asked),
        _demo(["--online", "--models", UNCACHED], url, tmp_path, "demo-online.log") as online,
        pytest.raises(Exception, match="could not load model 'org/not-cached'"),
    ):
        _compare(Client(online, verbose=False), file, question, [], model=UNCACHED)
    assert any(UNCACHED in path for path in asked), asked


def test_local_model_folder_and_a_video(client, tiny_qwen, tmp_path):
    """A model given as a local folder (a tiny random Qwen2-VL) answers a probe video; the overlay data covers
    every frame of the grid."""
    file, question, _ = write_probe_example("video: motion", 2, tmp_path)
    got = _compare(client, file, question, [{"method": "random", "budget": 16}], model=str(tiny_qwen))
    assert got["kind"] == "video"
    full, pruned = got["columns"][0]["alive"]["0"], got["columns"][1]["alive"]["0"]
    assert len({frame for _, frame, _, _ in full}) == 4  # 8 frames, two per temporal patch
    assert len(pruned) == 16 and {tuple(token) for token in pruned} <= {tuple(token) for token in full}
    with pytest.raises(Exception, match="takes images, not videos"):
        _compare(client, file, question, [])


DIGITS = 3  # a frame's index shows as three bands of grey, one hexadecimal digit each


def _indexed_frame(index: int, width: int, height: int) -> np.ndarray:
    pixels = np.empty((height, width, 3), dtype=np.uint8)
    for digit, rows in enumerate(np.array_split(np.arange(height), DIGITS)):
        pixels[rows] = (index >> 4 * digit) % 16 * 16 + 8
    return pixels


def _frame_index(frame: Image.Image) -> int:
    bands = np.array_split(np.asarray(frame.convert("L"), dtype=float), DIGITS)
    return sum(round((band.mean() - 8) / 16) << 4 * digit for digit, band in enumerate(bands))


def _write_mp4(path: Path, frames: int, width: int = 16, height: int = 16) -> Path:
    """An MP4 (MPEG-4 part 2) of `frames` frames, each showing its index."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=30)
        stream.width, stream.height = width, height
        for index in range(frames):
            frame = av.VideoFrame.from_ndarray(_indexed_frame(index, width, height), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def _write_gif(path: Path, frames: int) -> Path:
    first, *rest = (Image.fromarray(_indexed_frame(index, 8, 6)) for index in range(frames))
    first.save(path, save_all=True, append_images=rest, duration=40)
    return path


def test_a_long_video_is_sampled_without_keeping_its_frames(tmp_path):
    """3,000 frames of 192x144 (all of them as pictures: 237 MiB) are read as 16 evenly spaced frames, the right
    ones, for a few MiB at peak (measured in a fresh process)."""
    path = _write_mp4(tmp_path / "long.mp4", 3000, 192, 144)
    video = read_media(path)
    assert video.kind == "video" and video.frames[0].size == (192, 144)
    assert [_frame_index(frame) for frame in video.frames] == [index * 3000 // 16 for index in range(16)]
    measure = (  # the peak resident memory of this process alone (a child's ru_maxrss starts at its parent's)
        "import sys, av\n"
        "from mmtoken.demos.media import read_media\n"
        "peak = lambda: next(int(line.split()[1]) for line in open('/proc/self/status') if 'VmHWM' in line)\n"
        "before = peak()\n"
        "read_media(sys.argv[1])\n"
        "print(peak() - before)"
    )
    added_kib = int(subprocess.run([sys.executable, "-c", measure, str(path)], capture_output=True, text=True,
                                   check=True).stdout)  # fmt: skip
    assert added_kib * 2**10 < 3000 * 192 * 144 * 3 / 10


def test_animated_images_are_sampled_like_videos(tmp_path):
    gif = read_media(_write_gif(tmp_path / "long.gif", 40))
    assert gif.kind == "video" and [_frame_index(frame) for frame in gif.frames] == sampled_frames(40)
    short = read_media(_write_mp4(tmp_path / "short.mp4", 5))
    assert short.kind == "video" and [_frame_index(frame) for frame in short.frames] == [0, 1, 2, 3, 4]
    Image.new("RGB", (20, 10), "red").save(tmp_path / "still.gif")
    assert read_media(tmp_path / "still.gif").kind == "image"


@pytest.mark.parametrize(
    "kind, message",
    [
        ("long mp4", f"long.mp4 has over {MAX_VIDEO_FRAMES} frames; the limit is {MAX_VIDEO_FRAMES} frames"),
        ("long gif", f"long.gif has over {MAX_VIDEO_FRAMES} frames; the limit is {MAX_VIDEO_FRAMES} frames"),
        ("wide mp4", "wide.mp4 has frames of 2560x1440 pixels; the limit is 2.1 megapixels a frame"),
        ("wide png", "wide.png is 10000x9000 pixels; the limit is 89 megapixels"),
        ("bomb", "bomb.png is an image of over 179 megapixels; the limit is 89 megapixels"),
    ],
)
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # the 90-megapixel PNG, before it is refused
def test_media_over_the_limits_is_a_clear_message(tmp_path, bomb, kind, message):
    files = {
        "long mp4": lambda: _write_mp4(tmp_path / "long.mp4", MAX_VIDEO_FRAMES + 1),
        "long gif": lambda: _write_gif(tmp_path / "long.gif", MAX_VIDEO_FRAMES + 1),
        "wide mp4": lambda: _write_mp4(tmp_path / "wide.mp4", 2, 2560, 1440),
        "wide png": lambda: Image.new("1", (10_000, 9_000)).save(tmp_path / "wide.png") or tmp_path / "wide.png",
        "bomb": lambda: bomb,
    }
    with pytest.raises(ValueError, match=message):
        read_media(files[kind]())


def test_page_in_chromium_compares_and_draws(server, example, result, bomb, tmp_path):
    """Upload a probe image in the real page, compare, and see the same answers, the charts and the overlays;
    a decompression bomb and a video past the frame limit are clear messages in the preview."""
    file, question, _ = example
    long_video = _write_mp4(tmp_path / "long.mp4", MAX_VIDEO_FRAMES + 1)
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
        for hostile, message in [(bomb, "the limit is 89 megapixels"), (long_video, "the limit is 3600 frames")]:
            page.goto(server)
            page.locator("#media input[type=file]").set_input_files(str(hostile))
            expect(page.get_by_text(message).first).to_be_visible(timeout=30_000)
        browser.close()
    assert (OUTPUT / "demo.png").stat().st_size > 10_000
