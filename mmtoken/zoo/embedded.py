"""The trained probe models that ship inside the package, and the one way to ask them a probe question."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, PreTrainedModel, ProcessorMixin

from mmtoken.zoo.probe import Sample

MODELS = Path(__file__).parent / "models"
NAMES = ("probe-llava",)
# Tasks on which each model, unpatched, reaches the 90% floor on a fresh seed (see its MODEL_CARD.md); the others
# stay out of the default probe groups until training gets them there.
RELIABLE_TASKS = {"probe-llava": ("count", "color", "exist")}
# The papers' cut layers, placed for 32 decoder layers, scaled to each model's depth; used wherever a method runs
# on the model without its own layers (mmtoken compare, the lmms-eval model, sweeps).
METHOD_DEFAULTS = {"probe-llava": {"fastv": {"k": 1}, "pdrop": {"layers": (1, 2, 4)}}}


def path(name: str) -> Path:
    """The folder of an embedded model; raises for an unknown name or a model not trained yet."""
    if name not in NAMES:
        raise ValueError(f"unknown probe model {name!r}; embedded: {', '.join(NAMES)}")
    folder = MODELS / name
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{name} has no weights in {folder}; train it with `mmtoken zoo train {name}`")
    return folder


def load(name: str, dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, ProcessorMixin]:
    """An embedded probe model and its processor, loaded offline from the package."""
    folder = path(name)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=dtype, local_files_only=True)
    return model.eval(), AutoProcessor.from_pretrained(folder, local_files_only=True)


def ask(model: PreTrainedModel, processor: ProcessorMixin, sample: Sample, max_new_tokens: int = 6) -> str:
    """The model's greedy answer to a probe sample, as a string of words."""
    kind = "image" if sample.images is not None else "video"
    messages = [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": sample.question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    media = {"images": sample.images} if kind == "image" else {"videos": [sample.video]}
    inputs = processor(text=prompt, return_tensors="pt", **media).to(model.device)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
