"""Shared fixtures: tiny random-weight models of every supported family, built once per session."""

from __future__ import annotations

import os
from functools import cache

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

from mmtoken.zoo import load
from mmtoken.zoo.tiny import FAMILIES, VIDEO_FAMILIES, tiny_inputs, tiny_model

# One thread: on a 2-core machine shared with other work, two threads per process oversubscribe the cores and
# small ops wait on each other (a tiny model's decode step took 50-400 ms with two threads, 6 ms with one).
torch.set_num_threads(1)

CASES = [(family, False) for family in FAMILIES] + [(family, True) for family in FAMILIES if family in VIDEO_FAMILIES]
CASE_IDS = [f"{family}-{'video' if video else 'image'}" for family, video in CASES]

# pmod, gsearch and psigmoid are left out to spare test time: they reach the engine as PyramidDrop does (cuts ranked
# by its scorer, here at every layer where a per-layer curve falls); test_methods checks batch == rows and their
# counts on a model, test_parts their curves.
PRUNING = {
    "fastv": {"k": 2, "ratio": 0.4},
    "pdrop": {"layers": (2, 4), "ratio": 0.5},
    "random": {"ratio": 0.3},
    "uniform": {"ratio": 0.3},
    "pooling": {"stride": 2},
    "feather": {"layers": (2, 4), "ratio": 0.3},
    "atp": {"layers": (2, 4), "mass": 0.5},
    "visionzip": {"ratio": 0.3},
    "divprune": {"ratio": 0.3},
    "tome": {"ratio": 0.3},
    "aim": {"ratio": 0.5, "layer": 2, "step": 0.5},
    "holitom": {"ratio": 0.3, "layer": 3},
    "temporal": {"threshold": 0.5},
    # merging (whose count the merge decides) and an inner merge, then pruning planned on the survivors
    "pipeline": {
        "stages": ({"method": "holitom", "ratio": 0.5, "layer": 2}, {"method": "pdrop", "layers": (3, 5)}),
    },
}
KEEP_ALL = {
    "fastv": {"k": 2, "ratio": 1.0},
    "pdrop": {"layers": (2, 4), "ratio": 1.0},
    "random": {"ratio": 1.0},
    "uniform": {"ratio": 1.0},
    "pooling": {"stride": 1},
    "feather": {"layers": (2, 4), "ratio": 1.0},
    "atp": {"layers": (2, 4), "spatial": 1.0},
    "visionzip": {"ratio": 1.0},
    "divprune": {"ratio": 1.0},
    "tome": {"ratio": 1.0},
    "aim": {"ratio": 1.0, "step": 0},
    "holitom": {"ratio": 1.0, "threshold": 1.0, "merge": 0.0},
    "temporal": {"threshold": 1.0},
    "pipeline": {"stages": ({"method": "pooling", "stride": 1}, {"method": "pdrop", "layers": (2, 4), "ratio": 1.0})},
}
VIDEO_ONLY = {"temporal"}


def method_cases(methods: dict[str, dict]) -> list:
    """(case, method) for every method on every case it applies to: video-only methods skip the image cases."""
    return [
        pytest.param(case, method, id=f"{case_id}-{method}")
        for method in sorted(methods)
        for case, case_id in zip(CASES, CASE_IDS, strict=True)
        if case[1] or method not in VIDEO_ONLY
    ]


@cache
def model_and_processor(family: str, attention: str = "sdpa"):
    return tiny_model(family, attn_implementation=attention)


@cache
def probe_llava():
    """The embedded trained probe model and its processor, loaded once."""
    torch.set_num_threads(2)
    return load("probe-llava")


def inputs(family: str, video: bool, **kwargs):
    _, processor = model_and_processor(family)
    return tiny_inputs(processor, family, video=video, **kwargs)


def greedy(model, batch, new_tokens: int = 4) -> torch.Tensor:
    out = model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return out[:, batch["input_ids"].shape[1] :]


def greedy_run(model, batch, new_tokens: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """The greedy tokens and the logits of every greedy step, (batch, steps, vocabulary): prefill and decode."""
    out = model.generate(
        **batch,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    return out.sequences[:, batch["input_ids"].shape[1] :], torch.stack(out.logits, dim=1)


def greedy_logits(model, batch, new_tokens: int = 4) -> torch.Tensor:
    """The logits of every greedy step, (batch, steps, vocabulary): prefill and decode alike."""
    return greedy_run(model, batch, new_tokens)[1]


@cache
def unpatched(family: str, video: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The unpatched model's forward logits and greedy tokens on the two-row batch of a case, computed once."""
    model, _ = model_and_processor(family)
    batch = inputs(family, video, batch=2)
    with torch.no_grad():
        return model(**batch).logits, greedy(model, batch)


@pytest.fixture(params=CASES, ids=CASE_IDS)
def case(request):
    return request.param
