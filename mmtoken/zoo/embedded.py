"""The trained probe models that ship inside the package, and the one way to ask them a probe question."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, BatchFeature, PreTrainedModel, ProcessorMixin

from mmtoken import encoding
from mmtoken.encoding import Encoded
from mmtoken.methods.registry import build
from mmtoken.zoo import probe
from mmtoken.zoo.probe import Sample

MODELS = Path(__file__).parent / "models"
NAMES = ("probe-llava", "probe-qwen2vl")
# Tasks on which each model, unpatched, reaches the 90% floor on a fresh seed (see its MODEL_CARD.md); the others
# stay out of the default probe groups until training gets them there.
RELIABLE_TASKS = {"probe-llava": ("count", "color", "exist"), "probe-qwen2vl": ("order", "events", "needle")}
ACCURACY_FLOOR = {"image": 90, "video": 85}
# The papers' cut layers, placed for 32 decoder layers, scaled to each model's depth; used wherever a method runs
# on the model without its own layers (mmtoken compare, the lmms-eval model, sweeps).
_SIX_LAYERS = {
    "fastv": {"k": 1},
    "pdrop": {"layers": (1, 2, 4)},
    "feather": {"layers": (1, 3)},
    "atp": {"layers": (1, 3, 4)},
    "holitom": {"layer": 3},
}
_24_LAYERS = {
    "fastv": {"k": 2},
    "pdrop": {"layers": (6, 12, 18)},
    "feather": {"layers": (6, 12)},
    "atp": {"layers": (3, 10, 18)},
    "holitom": {"layer": 14},
}
METHOD_DEFAULTS = {"probe-llava": _SIX_LAYERS, "probe-qwen2vl": _SIX_LAYERS, "probe-llava-v2": _24_LAYERS,
                   "probe-qwen2vl-v2": _24_LAYERS}  # fmt: skip
# Budgets below what those layers reach (a first cut at layer 8 of 32 keeps a quarter of the tokens on average)
# take the same shape started earlier, as PyramidDrop's author advises for 128 and 64 tokens (issue 29 of
# Cooperx521/PyramidDrop: stages at 2, 8, 16 with the ratios lambda, lambda^2, ...): each stage moves to the
# place of the one before it and a new first stage sits at layer 2 of 32. The curve methods lower their floor.
_24_LAYERS_LOW_BUDGET = {
    "pdrop": {"layers": (2, 6, 12)},
    "feather": {"layers": (2, 6)},
    "atp": {"layers": (2, 3, 10)},
    "pmod": {"lowest": 0.05},
    "psigmoid": {"floor": 0.03},
}
LOW_BUDGET_DEFAULTS = {"probe-llava-v2": _24_LAYERS_LOW_BUDGET, "probe-qwen2vl-v2": _24_LAYERS_LOW_BUDGET}


def method_parameters(model_name: str, method: str, budget: float, depth: int, visual: int) -> dict[str, object]:
    """The parameters `method` runs with on the probe model `model_name` (of `depth` decoder layers) at `budget`
    visual tokens per layer out of `visual`: its defaults, or its low-budget shape where they cannot reach it."""
    defaults = METHOD_DEFAULTS.get(model_name, {}).get(method, {})
    low = LOW_BUDGET_DEFAULTS.get(model_name, {}).get(method)
    if low is None:
        return defaults
    try:
        build(method, budget=budget, **defaults).cuts(depth, visual)
    except ValueError:
        return {**defaults, **low}
    return defaults


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


def prompts(processor: ProcessorMixin, samples: list[Sample]) -> BatchFeature:
    """The processor's inputs for probe samples (all images or all videos), one left-padded batch."""
    kind = "image" if samples[0].images is not None else "video"
    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": sample.question}]}],
            add_generation_prompt=True,
            tokenize=False,
        )
        for sample in samples
    ]
    media = (
        {"images": [image for sample in samples for image in sample.images]}
        if kind == "image"
        else {"videos": [sample.video for sample in samples]}
    )
    return processor(text=texts, return_tensors="pt", padding=True, padding_side="left", **media)


def encode(model: PreTrainedModel, processor: ProcessorMixin, samples: list[Sample]) -> tuple[BatchFeature, Encoded]:
    """The prompts of probe samples and their media already through the vision tower (`mmtoken.encoding`), so that
    they can be answered many times, under different methods, for the cost of the language model only."""
    inputs = prompts(processor, samples).to(model.device)
    return inputs, encoding.encode(model, inputs)


def answers(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    inputs: dict,
    max_new_tokens: int = 6,
    encoded: Encoded | None = None,
) -> list[str]:
    """The model's greedy answers to a batch of probe inputs (from `prompts`, or `encode` with its `encoded` media),
    as strings of words."""
    with torch.no_grad(), nullcontext() if encoded is None else encoding.feeding(model, encoded):
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return [processor.decode(row, skip_special_tokens=True).strip() for row in out[:, inputs["input_ids"].shape[1] :]]


def ask(model: PreTrainedModel, processor: ProcessorMixin, sample: Sample, max_new_tokens: int = 6) -> str:
    """The model's greedy answer to a probe sample, as a string of words."""
    return answers(model, processor, prompts(processor, [sample]).to(model.device), max_new_tokens)[0]


def probe_samples(model_name: str, per_task: int, seed: int) -> list[Sample]:
    """`per_task` fresh image samples of each task the model answers reliably, drawn from `seed`."""
    tasks = RELIABLE_TASKS[model_name]
    return [sample for task in tasks for sample in probe.generate("image", n=per_task, seed=seed, task=task)]


def accuracy(samples: list[Sample], given: list[str]) -> dict[str, float]:
    """Accuracy % of the answers `given` to `samples` on each task, and the average over tasks."""
    hits: dict[str, list[bool]] = {}
    for sample, answer in zip(samples, given, strict=True):
        hits.setdefault(sample.task, []).append(answer == sample.answer)
    row = {task: 100 * sum(results) / len(results) for task, results in hits.items()}
    row["average"] = sum(row.values()) / len(row)
    return row
