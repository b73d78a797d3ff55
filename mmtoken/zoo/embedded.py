"""The trained probe models that ship inside the package, and the one way to ask them a probe question."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, PreTrainedModel, ProcessorMixin

from mmtoken.zoo.probe import Sample

MODELS = Path(__file__).parent / "models"
NAMES = ("probe-llava", "probe-qwen2vl")
# Tasks on which each model, unpatched, reaches the 90% floor on a fresh seed (see its MODEL_CARD.md); the others
# stay out of the default probe groups until training gets them there.
RELIABLE_TASKS = {"probe-llava": ("count", "color", "exist"), "probe-qwen2vl": ("order", "events", "needle")}


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
    return answers(model, processor, [sample], max_new_tokens)[0]


def answers(
    model: PreTrainedModel, processor: ProcessorMixin, samples: list[Sample], max_new_tokens: int = 6
) -> list[str]:
    """The model's greedy answers to probe samples of one kind, asked as one left-padded batch."""
    kinds = {"image" if sample.images is not None else "video" for sample in samples}
    if len(kinds) != 1:
        raise ValueError("answers() takes samples of one kind: all images or all videos")
    kind = kinds.pop()
    prompts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": sample.question}]}],
            add_generation_prompt=True,
            tokenize=False,
        )
        for sample in samples
    ]
    if kind == "image":
        media = {"images": [image for sample in samples for image in sample.images]}
    else:
        media = {"videos": [sample.video for sample in samples]}
    inputs = processor(text=prompts, padding=True, return_tensors="pt", **media).to(model.device)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1] :]
    return [text.strip() for text in processor.batch_decode(new, skip_special_tokens=True)]
