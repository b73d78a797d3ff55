"""Random method configurations and inputs, valid and hostile, on the tiny models of every family: whatever is
refused is refused with a ValueError, TypeError or KeyError before the first decoder layer runs, and whatever is
accepted runs through prefill and decode."""

from __future__ import annotations

import math
from collections import Counter
from functools import cache
from pathlib import Path
from typing import get_args, get_origin

import pytest
import yaml
from conftest import FAMILIES, VIDEO_FAMILIES, inputs, model_and_processor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import mmtoken
from mmtoken.methods import METHODS
from mmtoken.methods.base import parameter_types

CLEAR_ERRORS = (ValueError, TypeError, KeyError)
DEPTH = 6  # decoder layers of every tiny model
HOSTILE = st.sampled_from(
    [math.nan, math.inf, -math.inf, -1, 0, 0.5, 2.5, -3.7, DEPTH, DEPTH + 1, 2**63, True, False, "2", "fastv", 10**30,
     -(10**30), 1e300, (), [], (0,), (1,), (2.5, 4), (4, 2), (1, 1), (1, DEPTH), tuple(range(DEPTH + 1)), None,
     {"layers": 2}]
)  # fmt: skip
FORMS = ("name", "dict", "object", "yaml", "path")
SUFFIXES = (".yaml", ".yml", ".YAML", ".YML")
BROKEN_FILES = {
    "missing.yaml": None,
    "malformed.yaml": "method: [fastv\n",
    "list.yml": "- method: fastv\n",
    "empty.yaml": "",
    "no-method.yaml": "layers: [2, 4]\n",
}
VARIANTS = ("media", "media", "text", "mixed", "no pixels")
STAGES = sorted(set(METHODS) - {"pipeline"})
CHOICES = [*STAGES, *["pipeline"] * 4]  # a pipeline composes the others: drawn as often as four of them
NEEDED = {"layers", "layer", "stages"}


def _float(name: str) -> st.SearchStrategy:
    if name == "budget":
        return st.integers(1, 300) | st.floats(0.5, 300)
    if name == "slope":
        return st.floats(0.5, 40)
    if name in ("center", "shift"):
        return st.floats(-0.5, 1.5)
    return st.floats(0.01, 1.0)


def _valid_looking(name: str, annotation: object) -> st.SearchStrategy:
    """Values of the parameter's type, mostly in range: they reach the engine."""
    optional = get_origin(annotation) is not tuple and get_args(annotation)
    kind = next(member for member in get_args(annotation) if member is not type(None)) if optional else annotation
    if kind is int:
        return st.integers(-5, 2**40) if name == "seed" else st.integers(1, DEPTH - 1)
    if kind is float:
        return _float(name)
    if name == "keep":  # gsearch's schedule: non-increasing from the default visual 576, one count per layer
        counts = st.lists(st.integers(0, 576), min_size=DEPTH - 1, max_size=DEPTH - 1)
        return counts.map(lambda rest: [576, *sorted(rest, reverse=True)])
    return st.lists(st.integers(1, DEPTH - 1), min_size=1, max_size=4, unique=True).map(sorted)


@cache
def _parameters(method: str, hostile: bool) -> st.SearchStrategy:
    """Parameters of `method`, the others left at their defaults. In range: the layers (their defaults suit 32-layer
    models, not these 6-layer ones), gsearch's required schedule and a pipeline's stages, plus at most two others
    (more would mostly meet the rule that allows one of keep, ratio and budget). `hostile`: any of them, of the
    wrong type or out of any range, or unknown."""
    strategies = {}
    for name, annotation in parameter_types(METHODS[method]).items():
        valid = _stages(hostile) if name == "stages" else _valid_looking(name, annotation)
        strategies[name] = valid | HOSTILE if hostile else valid
    if hostile:
        return st.fixed_dictionaries({}, optional={**strategies, "not_a_parameter": st.just(1)})
    needed = {name for name in strategies if name in NEEDED or (method, name) == ("gsearch", "keep")}
    chosen = st.lists(st.sampled_from(sorted(set(strategies) - needed)), max_size=2, unique=True)
    return chosen.flatmap(lambda names: st.fixed_dictionaries({name: strategies[name] for name in {*needed, *names}}))


def _stages(hostile: bool) -> st.SearchStrategy:
    stage = st.sampled_from(STAGES).flatmap(
        lambda name: _parameters(name, hostile).map(lambda params: {"method": name, **params})
    )
    return st.lists(stage, min_size=1, max_size=3)


def _config() -> st.SearchStrategy:
    """(method name, parameters): one configuration in four hostile."""
    return st.tuples(st.sampled_from(CHOICES), st.sampled_from((False, False, False, True))).flatmap(
        lambda chosen: _parameters(*chosen).map(lambda params: (chosen[0], params))
    )


def _family_and_video() -> st.SearchStrategy:
    return st.sampled_from(FAMILIES).flatmap(
        lambda family: st.tuples(st.just(family), st.booleans() if family in VIDEO_FAMILIES else st.just(False))
    )


def _prompt_batch(family: str, video: bool, rows: list[bool]) -> dict:
    """A left-padded batch whose rows are text-only (False) or hold one image or video (True)."""
    _, processor = model_and_processor(family)
    kind = "video" if video else "image"

    def prompt(with_media: bool) -> str:
        content = [{"type": kind}] if with_media else []
        content.append({"type": "text", "text": "what color is the box"})
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=False)  # fmt: skip

    side = 56 if video and family == "llava_onevision" else 112
    media = [Image.new("RGB", (side, side), (40, 80, 220)) for _ in range(sum(rows))]
    given = {} if not media else {"videos": [media[:1] * 4] * len(media)} if video else {"images": media}
    return dict(processor(text=[prompt(row) for row in rows], padding=True, return_tensors="pt", **given))


@cache
def _batch(family: str, video: bool, batch: int, variant: str) -> dict:
    if variant == "text":
        return _prompt_batch(family, video, [False] * batch)
    if variant == "mixed":
        return _prompt_batch(family, video, [False, True])
    built = dict(inputs(family, video, batch=batch))
    if variant == "no pixels":
        built = {key: value for key, value in built.items() if not key.startswith("pixel_values")}
    return built


def _plain(value: object) -> object:
    """`value` as YAML can write it safely: tuples as lists."""
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


def _method(folder: Path, form: str, suffix: str, name: str, params: dict) -> tuple[object, dict]:
    """The method and keyword parameters to patch with, in one of the ways a user can give them."""
    if form == "name":
        return name, params
    if form == "dict":
        return {"method": name, **params}, {}
    if form == "object":
        return METHODS[name](**params), {}
    path = folder / f"method{suffix}"
    path.write_text(yaml.safe_dump(_plain({"method": name, **params})))
    return (path if form == "path" else str(path)), {}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    made = tmp_path_factory.mktemp("fuzz")
    for name, text in BROKEN_FILES.items():
        if text is not None:
            (made / name).write_text(text)
    return made


def _outcome(family: str, method: object, params: dict, batch: dict) -> str:
    """Patch, generate two tokens and read the stats: "ran", or the name of the clear error that refused the input
    before the first decoder layer ran. Anything else fails the test."""
    model, _ = model_and_processor(family)
    calls = []
    counter = model.get_decoder().layers[0].register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        handle = mmtoken.patch(model, method, **params)
        model.generate(**batch, max_new_tokens=2, min_new_tokens=2, do_sample=False)
        handle.stats.as_dict(), handle.alive_visual_tokens()
        return "ran"
    except CLEAR_ERRORS as error:
        assert not calls, f"{type(error).__name__} after {len(calls)} calls of the first decoder layer: {error}"
        return type(error).__name__
    finally:
        counter.remove()
        if hasattr(model, "_mmtoken_handle"):
            mmtoken.unpatch(model)


@settings(
    max_examples=2000,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)
@given(
    config=_config(),
    form=st.sampled_from(FORMS),
    suffix=st.sampled_from(SUFFIXES),
    broken=st.sampled_from([None] * 9 + sorted(BROKEN_FILES)),
    media=_family_and_video(),
    batch=st.sampled_from((1, 2)),
    variant=st.sampled_from(VARIANTS),
)
def _fuzz(folder, outcomes, config, form, suffix, broken, media, batch, variant):
    (family, video), (name, params) = media, config
    try:
        method, extra = (folder / broken, {}) if broken else _method(folder, form, suffix, name, params)
    except CLEAR_ERRORS as error:  # a Method object refused as it is made
        outcomes[type(error).__name__] += 1
        return
    outcomes[_outcome(family, method, extra, _batch(family, video, batch, variant))] += 1


def test_bad_input_is_refused_clearly_and_early(folder):
    """Every failure is a ValueError, TypeError or KeyError raised before the first decoder layer runs (a decode step
    that fails after the prefill fails the test too), and a good share of the configurations run."""
    outcomes = Counter()
    _fuzz(folder, outcomes)
    assert outcomes["ran"] >= 500, outcomes  # a quarter of the examples
