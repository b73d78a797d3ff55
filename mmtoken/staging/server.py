"""An OpenAI-compatible server: `POST /v1/chat/completions` (images as data URLs, or files under a folder the server
is allowed to read; streaming as server-sent events) in front of a `Scheduler`. Decoding is greedy.

Every request is checked before it is queued: a malformed one gets a 400 with what is wrong, a full queue a 429;
every accepted request gets its answer or an error (503 where it ran out of device memory by itself).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from PIL import Image, UnidentifiedImageError

from mmtoken.staging.jobs import Job
from mmtoken.staging.scheduler import OutOfMemory, Overloaded, Scheduler


class BadRequest(ValueError):
    """What is wrong with a request, said to its sender (HTTP 400)."""


def _error(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def load_image(url: str, allowed: Path | None) -> Image.Image:
    """The image a message part names: a `data:` URL, or a file (a path or `file://` URL) inside `allowed`."""
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if not header.endswith(";base64"):
            raise BadRequest("an image data URL must be base64: data:image/png;base64,...")
        try:
            data = base64.b64decode(payload, validate=True)
        except binascii.Error as error:
            raise BadRequest(f"the image data URL is not valid base64 ({error})") from None
        source: object = io.BytesIO(data)
    elif url.startswith(("http://", "https://")):
        raise BadRequest("this server fetches no remote media: send the image as a data URL")
    else:
        path = Path(url.removeprefix("file://")).resolve()
        if allowed is None or not path.is_relative_to(allowed):
            raise BadRequest(f"the server may not read {url}: send a data URL, or a file under the folder it serves")
        if not path.is_file():
            raise BadRequest(f"no such image file: {url}")
        source = path
    try:
        with Image.open(source) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise BadRequest(f"the image could not be read ({error})") from None


def chat_prompt(body: dict, allowed: Path | None) -> tuple[list[dict], list[Image.Image]]:
    """The messages of an OpenAI chat request in the processor's chat format, and their images in order."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list of {'role': ..., 'content': ...}")
    converted, images = [], []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise BadRequest(f"messages[{index}] needs a role of system, user or assistant")
        content = message.get("content")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not isinstance(content, list):
            raise BadRequest(f"messages[{index}].content must be a string or a list of parts")
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image_url" and isinstance(part.get("image_url"), dict) and "url" in part["image_url"]:
                images.append(load_image(str(part["image_url"]["url"]), allowed))
                parts.append({"type": "image"})
            else:
                raise BadRequest(f"messages[{index}] has a part this server does not take: {json.dumps(part)[:200]}")
        converted.append({"role": message["role"], "content": parts})
    return converted, images


def _generation_limit(body: dict, largest: int) -> int:
    for name, greedy in (("n", 1), ("temperature", 0), ("top_p", 1)):
        if body.get(name) is not None and body[name] != greedy:
            raise BadRequest(f"this server decodes greedily, one answer per request: '{name}' must be {greedy}")
    tokens = body.get("max_completion_tokens", body.get("max_tokens", 256))
    if not isinstance(tokens, int) or isinstance(tokens, bool) or not 1 <= tokens <= largest:
        raise BadRequest(f"max_tokens must be an integer in [1, {largest}], got {tokens!r}")
    return tokens


def create_app(
    scheduler: Scheduler, processor: object, model_name: str, allowed_media: Path | None = None, largest: int = 1024
) -> FastAPI:
    """The app serving `scheduler`'s model as `model_name`."""
    app = FastAPI(title="mmtoken")
    tokenizer = processor.tokenizer
    allowed = None if allowed_media is None else allowed_media.resolve()

    def job_of(body: dict, on_token: object) -> Job:
        if body.get("model") != model_name:
            raise LookupError(f"this server serves the model '{model_name}', not {body.get('model')!r}")
        max_tokens = _generation_limit(body, largest)
        messages, images = chat_prompt(body, allowed)
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        try:
            inputs = processor(text=[text], images=images or None, return_tensors="pt")
        except (ValueError, TypeError) as error:
            raise BadRequest(f"the processor refused the prompt: {error}") from None
        return Job(dict(inputs), max_tokens, on_token=on_token)

    def answer(job: Job) -> dict:
        finish = "length" if len(job.tokens) >= job.max_tokens else "stop"
        prompt = int(job.inputs["input_ids"].shape[1])
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model_name,
            "choices": [{"index": 0, "finish_reason": finish, "message": {
                "role": "assistant", "content": tokenizer.decode(job.tokens, skip_special_tokens=True)}}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": len(job.tokens),
                      "total_tokens": prompt + len(job.tokens)},
        }  # fmt: skip

    def failure(error: BaseException) -> JSONResponse:
        if isinstance(error, OutOfMemory):
            return _error(503, f"the request ran out of device memory: {error}", "server_overloaded")
        if isinstance(error, ValueError):
            return _error(400, str(error), "invalid_request_error")
        return _error(500, f"{type(error).__name__}: {error}", "server_error")

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "mmtoken"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> object:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "the body is not JSON", "invalid_request_error")
        if not isinstance(body, dict):
            return _error(400, "the body must be a JSON object", "invalid_request_error")
        loop, tokens = asyncio.get_running_loop(), asyncio.Queue()
        stream = body.get("stream") is True
        on_token = (lambda token: loop.call_soon_threadsafe(tokens.put_nowait, token)) if stream else None
        try:
            job = await asyncio.to_thread(job_of, body, on_token)
            scheduler.submit(job)
        except BadRequest as error:
            return _error(400, str(error), "invalid_request_error")
        except LookupError as error:
            return _error(404, str(error), "model_not_found")
        except Overloaded as error:
            return JSONResponse({"error": {"message": f"overloaded: {error}; retry later", "type": "rate_limit",
                                           "code": 429}}, status_code=429, headers={"Retry-After": "1"})  # fmt: skip
        except RuntimeError as error:
            return _error(503, str(error), "server_overloaded")
        done = asyncio.wrap_future(job.future)
        if not stream:
            try:
                await done
            except Exception as error:
                return failure(error)
            return answer(job)
        done.add_done_callback(lambda _: tokens.put_nowait(None))
        return StreamingResponse(_events(job, done, tokens, tokenizer, model_name, failure),
                                 media_type="text/event-stream")  # fmt: skip

    return app


async def _events(job: Job, done: asyncio.Future, tokens: asyncio.Queue, tokenizer: object, model_name: str,
                  failure: object) -> AsyncIterator[str]:  # fmt: skip
    """The server-sent events of one streamed answer: a chunk per new piece of text, the finish reason, [DONE]."""
    identity, created, received, sent = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), [], ""

    def chunk(delta: dict, finish: str | None = None) -> str:
        body = {"id": identity, "object": "chat.completion.chunk", "created": created, "model": model_name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}  # fmt: skip
        return f"data: {json.dumps(body)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    while (token := await tokens.get()) is not None:
        received.append(token)
        text = tokenizer.decode(received, skip_special_tokens=True)
        if len(text) > len(sent) and not text.endswith("\ufffd"):  # a character split across tokens waits
            yield chunk({"content": text[len(sent) :]})
            sent = text
    if done.exception() is not None:
        yield f"data: {failure(done.exception()).body.decode()}\n\n"
    else:
        text = tokenizer.decode(job.tokens, skip_special_tokens=True)
        if len(text) > len(sent):
            yield chunk({"content": text[len(sent) :]})
        yield chunk({}, "length" if len(job.tokens) >= job.max_tokens else "stop")
    yield "data: [DONE]\n\n"


def serve(
    model: str,
    method: str | None,
    params: dict,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch: int = 8,
    max_waiting: int = 64,
    cache_bytes: int = 2**30,
    allowed_media: Path | None = None,
    batching: str = "continuous",
    encoder: str = "local",
    chunk_tokens: int = 512,
) -> None:
    """Load `model` (an embedded probe model's name or a local folder), patch it with `method`, and serve it with
    `continuous`, `overlapped`, `chunked` (prefills of `chunk_tokens` at a time) or `static` batching
    (`mmtoken.staging.continuous`), its media encoded by the
    scheduler before their prefill (`local`) or in a thread of their own as requests arrive (`thread`)."""
    import torch
    import uvicorn
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import mmtoken
    from mmtoken.integrations import adapter_for
    from mmtoken.staging.chunked import check_chunkable
    from mmtoken.staging.continuous import check_joinable, make_scheduler
    from mmtoken.staging.embedding_cache import EmbeddingCache
    from mmtoken.staging.encoders import LocalEncoder, ThreadEncoder
    from mmtoken.zoo.embedded import NAMES, load

    built = None if method is None else mmtoken.methods.build(method, **params)  # bad ones fail before loading
    if built is not None and batching != "static":
        try:
            check_joinable(built)
        except ValueError as error:
            raise SystemExit(f"mmtoken serve: {error}; serve it with --batching static") from None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if model in NAMES:
        loaded, processor = load(model, dtype)
    elif Path(model).is_dir():
        loaded = AutoModelForImageTextToText.from_pretrained(model, dtype=dtype, local_files_only=True).eval()
        processor = AutoProcessor.from_pretrained(model, local_files_only=True)
    else:
        raise SystemExit(f"mmtoken serve: {model!r} is neither an embedded model ({', '.join(NAMES)}) nor a folder")
    loaded.to(device)
    if built is not None and batching == "chunked":
        try:
            check_chunkable(built, len(adapter_for(loaded).decoder_layers))
        except ValueError as error:
            raise SystemExit(f"mmtoken serve: {error}") from None
    signal = False
    if built is not None:
        handle = mmtoken.patch(loaded, built)
        signal = any(step.needs_vision for step in handle.method.steps)
    settings = processor.image_processor.to_dict()
    encoding = (ThreadEncoder if encoder == "thread" else LocalEncoder)(
        loaded, EmbeddingCache(cache_bytes), settings, signal
    )
    scheduler = make_scheduler(batching, loaded, processor, encoding, max_batch, max_waiting, chunk_tokens).start()
    app = create_app(scheduler, processor, Path(model).name, allowed_media)
    try:
        uvicorn.run(app, host=host, port=port, log_level="info")
    finally:
        scheduler.close()
        if isinstance(encoding, ThreadEncoder):
            encoding.close()
