"""The comparison behind the demo, as plain functions: one model and one input, unpatched and under up to four
methods, returned as JSON-ready numbers. The Gradio page and its `compare` API endpoint both call `Comparer`."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import torch
from huggingface_hub import is_offline_mode
from transformers import AutoModelForImageTextToText, AutoProcessor, PreTrainedModel, ProcessorMixin
from transformers.generation.streamers import BaseStreamer

import mmtoken
from mmtoken.demos.media import Media, read_media
from mmtoken.integrations import adapter_for
from mmtoken.methods import build
from mmtoken.zoo import embedded

MAX_METHODS = 4
MAX_QUESTION_CHARS = 1000
# The unpatched column runs through a patch that keeps every token: the same tokens and answers (tested in
# tests/test_invariants.py), and it reports the same stats as the methods, hooks' own cost included.
KEEP_ALL = {"method": "random", "ratio": 1.0}
OFFLINE = "(offline: a hub id loads from the local cache only; `mmtoken demo --online` downloads it)"


def embedded_models() -> list[str]:
    """The trained probe models this install ships (those of `mmtoken.zoo` whose weights are present)."""
    return [name for name in embedded.NAMES if (embedded.MODELS / name / "config.json").exists()]


def load_model(name: str) -> tuple[PreTrainedModel, ProcessorMixin]:
    """An embedded probe model by name, or any supported model from a local folder or hub id; ValueError naming
    the model when it does not load or its family is not supported."""
    if name in embedded_models():
        model, processor = embedded.load(name)
    else:
        try:
            model = AutoModelForImageTextToText.from_pretrained(name, dtype="auto").eval()
            processor = AutoProcessor.from_pretrained(name)
        except Exception as error:  # whatever from_pretrained raises, the page shows it as a message
            offline = f" {OFFLINE}" if is_offline_mode() else ""
            raise ValueError(f"could not load model {name!r}{offline}: {error}") from error
    adapter_for(model)
    return model.to("cuda" if torch.cuda.is_available() else "cpu"), processor


class _FirstTokenClock(BaseStreamer):
    """Notes when `generate` hands out its first new token (its first `put` is the prompt)."""

    def __init__(self) -> None:
        self.puts, self.first_token_at = 0, 0.0

    def put(self, value: torch.Tensor) -> None:
        self.puts += 1
        if self.puts == 2:
            self.first_token_at = time.perf_counter()

    def end(self) -> None:
        pass


def check_methods(methods: list[dict]) -> list[dict]:
    """Each method as a dict {"method": name, "budget": N, other parameters}, built once to check it."""
    if not isinstance(methods, list) or not all(isinstance(method, dict) for method in methods):
        raise TypeError('methods must be a list of dicts such as {"method": "fastv", "budget": 128}')
    if len(methods) > MAX_METHODS:
        raise ValueError(f"at most {MAX_METHODS} methods at once, got {len(methods)}")
    for method in methods:
        build(method)
    return methods


def check_question(question: str | None) -> str:
    question = (question or "").strip()
    if not question:
        raise ValueError("type a question about the image or video")
    if len(question) > MAX_QUESTION_CHARS:
        raise ValueError(f"the question has {len(question)} characters; the limit is {MAX_QUESTION_CHARS}")
    return question


def _prompt(model: PreTrainedModel, processor: ProcessorMixin, media: Media, question: str) -> dict:
    if media.kind == "video" and getattr(model.config, "video_token_id", None) is None:
        raise ValueError(f"this model ({model.config.model_type}) takes images, not videos")
    messages = [{"role": "user", "content": [{"type": media.kind}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    given = {"images": media.frames} if media.kind == "image" else {"videos": [media.frames]}
    return processor(text=prompt, return_tensors="pt", **given).to(model.device)


def _check_schedules(model: PreTrainedModel, inputs: dict, methods: list[dict]) -> None:
    """Raise, before any column runs, for a method whose schedule does not fit this model and input."""
    adapter = adapter_for(model)
    call = adapter.call_state(inputs["input_ids"], inputs.get("attention_mask"), inputs)
    depth = len(adapter.decoder_layers)
    for method in methods:
        preset = build(method)
        preset.check_depth(depth)
        preset.cuts(depth, call.visual_counts[0])


def run_column(model: PreTrainedModel, processor: ProcessorMixin, inputs: dict, method: dict, new_tokens: int) -> dict:
    """One method on one input: its answer, TTFT, `handle.stats` and where its visual tokens stayed alive."""
    clock = _FirstTokenClock()
    with mmtoken.patched(model, method, timing=True) as handle, torch.no_grad():
        started = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, streamer=clock)
        stats, alive = handle.stats.as_dict(), handle.alive_visual_tokens()
    answer = processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    return {
        "method": method,
        "answer": answer,
        "ttft_seconds": clock.first_token_at - started,
        **stats,
        "alive": {str(layer): rows[0].tolist() for layer, rows in alive.items()},
    }


class Comparer:
    """Serves comparisons on `models` (loading one replaces the one loaded), the first loaded now. A lock makes
    loading and each request's patch, generate and unpatch one step, so no request runs under another's patch
    and no model changes under a running request."""

    def __init__(self, models: list[str]) -> None:
        self.models = models
        self._lock = threading.Lock()
        self._name: str | None = None
        self._loaded: tuple[PreTrainedModel, ProcessorMixin] | None = None
        if models:
            self._load(models[0])

    def _load(self, name: str) -> tuple[PreTrainedModel, ProcessorMixin]:
        if name != self._name:
            self._loaded, self._name = None, None
            self._loaded, self._name = load_model(name), name
        return self._loaded

    def compare(
        self, model: str, media: str | Path | None, question: str | None, methods: list[dict], new_tokens: int = 8
    ) -> dict:
        """The unpatched model and each of `methods` on one input; every input is checked before any work."""
        if model not in self.models:
            raise ValueError(f"{model!r} is not a model this demo serves: {', '.join(self.models)} "
                             "(`mmtoken demo --models FOLDER_OR_HUB_ID ...` adds others)")  # fmt: skip
        question, methods = check_question(question), check_methods(methods)
        if not 1 <= new_tokens <= 256:
            raise ValueError(f"new tokens must be between 1 and 256, got {new_tokens}")
        loaded_media = read_media(media)
        with self._lock:
            network, processor = self._load(model)
            inputs = _prompt(network, processor, loaded_media, question)
            _check_schedules(network, inputs, methods)
            columns = [run_column(network, processor, inputs, spec, new_tokens) for spec in [KEEP_ALL, *methods]]
        columns[0]["method"] = {"method": "unpatched"}
        center_crop = bool(getattr(getattr(processor, "image_processor", None), "do_center_crop", False))
        return {"model": model, "kind": loaded_media.kind, "center_crop": center_crop, "question": question,
                "columns": columns}  # fmt: skip
