"""Shared fixtures: tiny random-weight models of every supported family, built once per session."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from functools import cache

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on the CPU, in the interpreter

from mmtoken.methods import METHODS
from mmtoken.methods.base import ON_CACHE, CurveMethod, Examples
from mmtoken.zoo import load
from mmtoken.zoo.tiny import FAMILIES, VIDEO_FAMILIES, tiny_inputs, tiny_model

# One thread: on a 2-core machine shared with other work, two threads per process oversubscribe the cores and
# small ops wait on each other (a tiny model's decode step took 50-400 ms with two threads, 6 ms with one).
torch.set_num_threads(1)

CASES = [(family, False) for family in FAMILIES] + [(family, True) for family in FAMILIES if family in VIDEO_FAMILIES]
CASE_IDS = [f"{family}-{'video' if video else 'image'}" for family, video in CASES]

# The curve methods (pmod, gsearch, psigmoid) are left out to spare test time: they reach the engine as PyramidDrop
# does (cuts ranked by its scorer, here at every layer where a per-layer curve falls); test_methods checks batch ==
# rows and their counts on a model (and fails for a curve method it does not check), test_parts their curves.
# The KV presses cut no tokens; tests/test_kv.py holds them to the same invariants, on their caches.
INVARIANT_METHODS = sorted(
    name for name, cls in METHODS.items() if not issubclass(cls, CurveMethod) and cls.stage != ON_CACHE
)
PRESSES = sorted(name for name, cls in METHODS.items() if cls.stage == ON_CACHE)


def examples(method: str) -> Examples:
    """The parameters the tests run `method` with, declared on its class; fails the test where the class has none."""
    cls = METHODS[method]
    declared = cls.__dict__.get("examples")
    if not isinstance(declared, Examples):
        message = f"{method}: {cls.__name__} declares no `examples = Examples(...)` (mmtoken.methods.base)"
        pytest.fail(f"{message}, the parameters the tests run it with on every family", pytrace=False)
    return declared


class Settings(Mapping[str, dict]):
    """The `kind` example parameters (`cutting` or `keep_all`) of each method the invariant tests run, by name, read
    from its class; a method whose examples give none fails the test that asks."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __getitem__(self, method: str) -> dict:
        params = getattr(examples(method), self.kind)
        if params is None:
            pytest.fail(f"{method}: its examples give no `{self.kind}` parameters for the invariants", pytrace=False)
        return params

    def __iter__(self) -> Iterator[str]:
        return iter(INVARIANT_METHODS)

    def __len__(self) -> int:
        return len(INVARIANT_METHODS)


PRUNING, KEEP_ALL = Settings("cutting"), Settings("keep_all")


def method_cases(methods: Iterable[str]) -> list:
    """(case, method) for every method on every case it applies to: video-only methods skip the image cases."""
    return [
        pytest.param(case, method, id=f"{case_id}-{method}")
        for method in sorted(methods)
        for case, case_id in zip(CASES, CASE_IDS, strict=True)
        if case[1] or not METHODS[method].video_only
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
