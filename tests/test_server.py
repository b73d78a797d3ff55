"""The OpenAI-compatible server on localhost, called with the official `openai` client: answers equal the
scheduler's, streaming equals not streaming, bad requests get a 400 that says why, and a burst with bad requests
mixed in loses none."""

from __future__ import annotations

import base64
import io
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import openai
import pytest
import torch
import uvicorn
from conftest import model_and_processor
from PIL import Image

import mmtoken
from mmtoken.staging.continuous import BATCHING
from mmtoken.staging.encoders import LocalEncoder
from mmtoken.staging.jobs import Job
from mmtoken.staging.scheduler import Scheduler
from mmtoken.staging.server import create_app
from mmtoken.zoo.tiny import _draw

NAME = "tiny-llava"


def _data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _message(url: str, question: str = "what color is the box") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": question}]}]  # fmt: skip


@contextmanager
def _serving(scheduler: Scheduler, processor, media=None):
    config = uvicorn.Config(create_app(scheduler, processor, NAME, media, largest=16), host="127.0.0.1", port=0,
                            log_level="warning")  # fmt: skip
    running = uvicorn.Server(config)
    thread = threading.Thread(target=running.run, daemon=True)
    thread.start()
    while not running.started:
        time.sleep(0.05)
    port = running.servers[0].sockets[0].getsockname()[1]
    try:
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
    finally:
        running.should_exit = True
        thread.join()


@pytest.fixture(scope="module", params=list(BATCHING.values()), ids=list(BATCHING))
def server(request, tmp_path_factory):
    torch.set_num_threads(1)
    model, processor = model_and_processor("llava")
    media = tmp_path_factory.mktemp("media")
    _draw((64, 64), 1).save(media / "box.png")
    scheduler = request.param(model, processor, LocalEncoder(model, None, {}, False), max_batch=4, max_waiting=6)
    scheduler.start()
    with _serving(scheduler, processor, media) as client:
        yield client, model, processor, scheduler, media
    scheduler.close()


def test_an_answer_is_what_the_scheduler_gives_and_streaming_gives_the_same(server):
    client, model, processor, _, media = server
    url = _data_url(_draw((64, 64), 1))
    reply = client.chat.completions.create(model=NAME, messages=_message(url), max_tokens=6)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is the box"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[_draw((64, 64), 1)], return_tensors="pt")
    alone = Scheduler(model, processor, LocalEncoder(model, None, {}, False))
    job = alone.submit(Job(dict(inputs), 6))
    alone.start().close()
    assert reply.choices[0].message.content == processor.tokenizer.decode(job.future.result(),
                                                                          skip_special_tokens=True)  # fmt: skip
    assert (
        reply.usage.completion_tokens == len(job.tokens) and reply.usage.prompt_tokens == inputs["input_ids"].shape[1]
    )
    assert reply.choices[0].finish_reason == ("length" if len(job.tokens) == 6 else "stop")
    chunks = list(client.chat.completions.create(model=NAME, messages=_message(url), max_tokens=6, stream=True))
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    assert streamed == reply.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason
    from_file = client.chat.completions.create(model=NAME, messages=_message(str(media / "box.png")), max_tokens=6)
    assert from_file.choices[0].message.content == reply.choices[0].message.content


@pytest.mark.parametrize(
    "change, message",
    [
        ({"messages": []}, "'messages' must be a non-empty list"),
        ({"messages": _message("https://example.com/cat.png")}, "fetches no remote media"),
        ({"messages": _message("/etc/hostname")}, "may not read /etc/hostname"),
        ({"messages": _message("data:image/png;base64,@@@")}, "not valid base64"),
        ({"messages": _message("data:image/png;base64,aGVsbG8=")}, "could not be read"),
        ({"temperature": 0.7}, "decodes greedily"),
        ({"max_tokens": 0}, r"max_tokens must be an integer in \[1, 16\]"),
        ({"max_tokens": 17}, r"max_tokens must be an integer in \[1, 16\]"),
    ],
)
def test_a_malformed_request_gets_a_400_that_says_why(server, change, message):
    client = server[0]
    request = {"model": NAME, "messages": _message(_data_url(_draw((64, 64), 0))), "max_tokens": 4} | change
    with pytest.raises(openai.BadRequestError, match=message):
        client.chat.completions.create(**request)


def test_another_model_name_is_not_found(server):
    with pytest.raises(openai.NotFoundError, match="serves the model 'tiny-llava'"):
        server[0].chat.completions.create(model="gpt-4o", messages=_message(_data_url(_draw((64, 64), 0))))


def test_a_burst_with_bad_requests_mixed_in_loses_no_accepted_request(server):
    client, _, _, scheduler, _ = server
    url = _data_url(_draw((64, 64), 2))

    def send(index: int) -> str:
        bad = index % 5 == 4
        try:
            reply = client.chat.completions.create(model=NAME, max_tokens=8 if not bad else 99,
                                                   messages=_message(url, f"question number {index}"))  # fmt: skip
            return "answered" if reply.choices[0].message.content is not None else "empty"
        except openai.BadRequestError:
            return "bad"
        except openai.RateLimitError:
            return "refused"

    with ThreadPoolExecutor(max_workers=20) as pool:
        outcomes = list(pool.map(send, range(40)))
    assert outcomes.count("bad") == 8
    assert outcomes.count("answered") + outcomes.count("refused") == 32 and outcomes.count("answered") >= 6
    assert scheduler.waiting == 0


def test_a_full_queue_answers_429_and_the_queued_request_still_gets_its_answer():
    model, processor = model_and_processor("llava")
    scheduler = Scheduler(model, processor, LocalEncoder(model, None, {}, False), max_waiting=1)
    request = {"model": NAME, "messages": _message(_data_url(_draw((64, 64), 0))), "max_tokens": 3}
    with _serving(scheduler, processor) as client, ThreadPoolExecutor(max_workers=1) as pool:
        first = pool.submit(client.chat.completions.create, **request)
        while scheduler.waiting == 0:
            time.sleep(0.01)
        with pytest.raises(openai.RateLimitError, match="1 requests are waiting"):
            client.chat.completions.create(**request)
        scheduler.start()
        assert first.result(timeout=60).usage.completion_tokens >= 1
    scheduler.close()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_mmtoken_serve_answers_under_a_method_with_the_encoder_in_a_thread(tmp_path):
    model, processor = model_and_processor("llava")
    model.save_pretrained(tmp_path / NAME)
    processor.save_pretrained(tmp_path / NAME)
    port = _free_port()
    command = [sys.executable, "-m", "mmtoken", "serve", str(tmp_path / NAME), "--method", "fastv", "--param",
               "ratio=0.5", "--port", str(port), "--encoder", "thread", "--batching", "overlapped"]  # fmt: skip
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stdout.read()
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.2)
        url = _data_url(_draw((64, 64), 1))
        reply = client.chat.completions.create(model=NAME, messages=_message(url), max_tokens=6)
        with mmtoken.patched(model, "fastv", ratio=0.5):
            messages = [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is the box"}]}
            ]
            text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            inputs = processor(text=[text], images=[_draw((64, 64), 1)], return_tensors="pt")
            alone = model.generate(**inputs, max_new_tokens=6, do_sample=False)[0, inputs["input_ids"].shape[1] :]
        assert reply.choices[0].message.content == processor.tokenizer.decode(alone, skip_special_tokens=True)
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_mmtoken_serve_refuses_a_method_continuous_batching_cannot_take_before_loading_anything(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mmtoken", "serve", "probe-llava", "--method", "h2o", "--port",
                           str(_free_port())], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert done.returncode != 0
    assert "h2o" in done.stderr and "--batching static" in done.stderr


@pytest.mark.parametrize(("options", "message"), [
    (["--method", "fastv", "--batching", "chunked"], "mmtoken serve: chunked prefill runs the prompt a chunk at a "
                                                     "time; fastv cuts or presses inside the language model"),
    (["--batching", "chunked", "--chunk-tokens", "0"], "error: --chunk-tokens must be >= 1"),
])  # fmt: skip
def test_mmtoken_serve_refuses_what_chunked_prefill_cannot_take_before_serving(options, message):
    done = subprocess.run([sys.executable, "-m", "mmtoken", "serve", "probe-llava", *options, "--port",
                           str(_free_port())], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert done.returncode != 0 and message in done.stderr
    assert "Traceback" not in done.stderr and "Uvicorn running" not in done.stderr
