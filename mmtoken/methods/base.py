"""A method is a preset of parts: a schedule of cuts, a scorer (what to keep) and a reducer (how the rest
leaves). Presets declare their parameters as dataclass fields, whose annotations `check_parameters` enforces,
and check their ranges in `__post_init__`."""

from __future__ import annotations

import math
import types
from dataclasses import dataclass, fields
from functools import cache
from numbers import Integral, Real
from typing import ClassVar, Union, get_args, get_origin, get_type_hints

import torch

from mmtoken.kv import Press
from mmtoken.reducers import Drop, GroupMean, Reducer
from mmtoken.schedules import Cut, single_cut_keep
from mmtoken.schedules.curves import curve_cuts
from mmtoken.scorers import LastQueryAttention, Scorer
from mmtoken.scorers.groups import GroupHeads, Grouping

BEFORE_LLM, AT_LAYER, ON_CACHE = "before_llm", "at_layer", "on_cache"
BEFORE_AND_AT_LAYER = f"{BEFORE_LLM}+{AT_LAYER}"


def _is_integer(value: object) -> bool:
    """Whether `value` is an integer that fits the 64 bits of a torch index or seed (a bool is no integer here)."""
    return isinstance(value, Integral) and not isinstance(value, bool) and -(2**63) <= value < 2**63


def _is_finite(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


_NAMES = {
    type(None): ("None", "None"),
    int: ("a 64-bit integer", "64-bit integers"),
    float: ("a finite number", "finite numbers"),
}


def _conforms(value: object, annotation: object) -> bool:
    """Whether `value` is of the parameter type `annotation`: `int` a 64-bit integer, `float` a finite real
    number, a tuple a list or tuple of its element type, a union any of its members; other annotations take any
    value."""
    if annotation is type(None):
        return value is None
    if annotation is int:
        return _is_integer(value)
    if annotation is float:
        return _is_finite(value)
    origin, members = get_origin(annotation), get_args(annotation)
    if origin in (Union, types.UnionType):
        return any(_conforms(value, member) for member in members)
    if tuple in (annotation, origin):
        return isinstance(value, (list, tuple)) and (not members or all(_conforms(item, members[0]) for item in value))
    return True


def _describe(annotation: object) -> str:
    origin, members = get_origin(annotation), get_args(annotation)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(member) for member in members)
    if tuple in (annotation, origin):
        return f"a list of {_NAMES[members[0]][1]}" if members else "a list"
    return _NAMES[annotation][0]


@cache
def parameter_types(cls: type) -> dict[str, object]:
    """The annotation of each parameter (dataclass field) of a Method class, resolved."""
    hints = get_type_hints(cls)
    return {field.name: hints[field.name] for field in fields(cls)}


def check_parameters(method: Method) -> None:
    """Raise TypeError unless every parameter of `method` is of its field's annotated type (see `_conforms`)."""
    for name, annotation in parameter_types(type(method)).items():
        value = getattr(method, name)
        if not _conforms(value, annotation):
            raise TypeError(f"{method.name}: {name} must be {_describe(annotation)}, got {value!r}")


def check_ratio(ratio: float) -> None:
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")


def check_budget(budget: float) -> None:
    if budget <= 0:
        raise ValueError(f"budget must be a positive number of visual tokens per layer, got {budget}")


def check_ratio_or_budget(name: str, ratio: float | None, budget: float | None) -> None:
    """At most one of a ratio and a budget, each valid."""
    if ratio is not None and budget is not None:
        raise ValueError(f"{name}: give one of ratio, budget")
    if ratio is not None:
        check_ratio(ratio)
    if budget is not None:
        check_budget(budget)


def check_layers(name: str, layers: tuple[int, ...]) -> tuple[int, ...]:
    """`layers` as a tuple; raises unless they are increasing layer indices >= 1."""
    layers = tuple(layers)
    if not layers or list(layers) != sorted(set(layers)) or layers[0] < 1:
        raise ValueError(f"{name}: layers must be increasing layer indices >= 1, got {layers}")
    return layers


def merge_cut(layer: int, keep: int, grouping: Grouping) -> Cut:
    """A cut at `layer` that keeps the heads of `grouping`'s groups, each the weighted mean of its group."""
    return Cut(layer, keep, GroupHeads(grouping), GroupMean(grouping))


@dataclass(frozen=True, kw_only=True)
class Examples:
    """Parameters of a method that the tests run it with on the tiny 6-layer models of every family
    (`mmtoken.zoo.tiny`): `cutting` removes visual tokens there and `keep_all` keeps every one (the invariant tests
    run both; the curve methods, which they leave out, give neither), `too_deep` names a decoder layer those models
    lack, which `mmtoken.patch` must refuse (None: no parameter names a layer)."""

    too_deep: dict | None
    cutting: dict | None = None
    keep_all: dict | None = None


@dataclass
class Method:
    """Base of every method: `cuts(depth, visual)` says where and how many, `scorer` what, `reducer` how (for the
    cuts that name no scorer or reducer of their own). `needs_vision` asks the engine to record the vision encoder's
    attention (`ScoreInput.vision_signal`); `video_only` methods merge across frames and leave an image whole.
    `examples` are the parameters the tests run the method with; every registered method declares its own."""

    name: ClassVar[str]
    paper: ClassVar[str]
    stage: ClassVar[str]
    examples: ClassVar[Examples]
    needs_vision: ClassVar[bool] = False
    video_only: ClassVar[bool] = False

    def __post_init__(self) -> None:
        check_parameters(self)

    def cuts(self, depth: int, visual: int) -> list[Cut]:
        raise NotImplementedError

    @property
    def scorer(self) -> Scorer:
        raise NotImplementedError

    @property
    def reducer(self) -> Reducer:
        return Drop()

    def named_layers(self, depth: int) -> tuple[int, ...]:
        """The decoder layers the parameters put a cut at (defaults resolved for a model of `depth` layers), which
        `check_depth` holds against the model. Empty where no parameter names a layer."""
        raise NotImplementedError(f"{type(self).__name__}: define `named_layers`, the decoder layers it cuts at")

    def check_depth(self, depth: int) -> None:
        """Raise ValueError if the parameters name a decoder layer the model does not have."""
        past = [layer for layer in self.named_layers(depth) if layer >= depth]
        if past:
            raise ValueError(f"{self.name}: layer {max(past)} is past the model's {depth} decoder layers")

    @property
    def steps(self) -> list[Method]:
        """The methods the engine runs one after the other: this one alone, or a pipeline's stages."""
        return [self]


@dataclass
class SingleCut(Method):
    """One cut at layer `cut_layer`, keeping `keep` visual tokens, a `ratio` of them, or as many as make the
    average per layer equal `budget` (give at most one; the default is the preset's ratio)."""

    keep: int | None = None
    ratio: float | None = None
    budget: float | None = None
    default_ratio: ClassVar[float] = 0.25

    @property
    def cut_layer(self) -> int:
        raise NotImplementedError

    def __post_init__(self) -> None:
        super().__post_init__()
        given = [name for name in ("keep", "ratio", "budget") if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(f"{self.name}: give one of keep, ratio, budget, not {' and '.join(given)}")
        if self.keep is not None and self.keep < 0:
            raise ValueError(f"{self.name}: keep must be >= 0, got {self.keep}")
        if self.ratio is not None:
            check_ratio(self.ratio)
        if self.budget is not None:
            check_budget(self.budget)

    def named_layers(self, depth: int) -> tuple[int, ...]:
        return (self.cut_layer,)

    def cuts(self, depth: int, visual: int) -> list[Cut]:
        if self.budget is not None:
            return [Cut(self.cut_layer, single_cut_keep(self.budget, self.cut_layer, depth, visual))]
        if self.keep is not None:
            return [Cut(self.cut_layer, min(self.keep, visual))]
        ratio = self.default_ratio if self.ratio is None else self.ratio
        return [Cut(self.cut_layer, round(ratio * visual))]


@dataclass
class Baseline(SingleCut):
    """A simple baseline: one cut at `layer`, before the language model by default."""

    layer: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layer < 0:
            raise ValueError(f"{self.name}: layer must be >= 0, got {self.layer}")

    @property
    def cut_layer(self) -> int:
        return self.layer


@dataclass
class CurveMethod(Method):
    """A method whose schedule is the share of visual tokens alive at each layer (`mmtoken.schedules.curves`):
    cut wherever the share falls, ranked by the last instruction token's attention recomputed at the cut layer
    (as PyramidDrop)."""

    stage: ClassVar[str] = AT_LAYER

    def shares(self, depth: int, visual: int) -> list[float]:
        """The share of the visual tokens alive at each layer."""
        raise NotImplementedError

    def named_layers(self, depth: int) -> tuple[int, ...]:
        return ()  # the curve runs over the model's own layers

    def cuts(self, depth: int, visual: int) -> list[Cut]:
        return curve_cuts(self.shares(depth, visual), visual)

    @property
    def scorer(self) -> Scorer:
        return LastQueryAttention(layer_offset=0)


@dataclass
class CachePress(Method):
    """Base of the methods that compact the KV cache (stage `on_cache`): in every decoder layer, the visual entries
    that `press` scores best stay, with every text entry: the `ratio` of them (default 0.25), or at most `capacity`
    of them per row. With `visual_only=False` the share is of all entries. After the prefill by default; with
    `chunk_frames` (and a `capacity`), the prompt is prefilled that many frames at a time and the cache pressed
    after every chunk (`mmtoken.engine.streaming`), so no layer holds more than the capacity and one chunk; with
    `chunk_shares`, every chunk so far keeps an equal share of the capacity, its best entries by the press
    (`mmtoken.kv.shares`). Presses cut no tokens: the prefill computes what it computes unpatched (chunked: over the
    pressed cache of the chunks before); the memory of the entries that leave is freed."""

    stage: ClassVar[str] = ON_CACHE
    ratio: float | None = None
    capacity: int | None = None
    visual_only: bool = True
    chunk_frames: int | None = None
    chunk_shares: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ratio is not None and self.capacity is not None:
            raise ValueError(f"{self.name}: give one of ratio, capacity")
        if self.ratio is not None and not 0 < self.ratio <= 1:
            raise ValueError(
                f"{self.name}: ratio is the share of the KV entries that stay, in (0, 1], got {self.ratio}"
            )
        if self.capacity is not None and self.capacity < 0:
            raise ValueError(f"{self.name}: capacity is a number of KV entries per row, >= 0, got {self.capacity}")
        if self.chunk_frames is not None:
            if self.chunk_frames < 1:
                raise ValueError(f"{self.name}: chunk_frames must be >= 1, got {self.chunk_frames}")
            if self.capacity is None:
                raise ValueError(f"{self.name}: a streaming prefill (chunk_frames) keeps a fixed capacity: give one")
        elif self.chunk_shares:
            raise ValueError(f"{self.name}: chunk_shares shares the capacity among a streaming prefill's chunks: "
                             "give chunk_frames")  # fmt: skip

    def kept(self, candidates: torch.Tensor) -> torch.Tensor:
        """How many entries each row keeps of its `candidates` (a count per row, on the device)."""
        if self.capacity is not None:
            return candidates.clamp(max=self.capacity)
        return (candidates.float() * (0.25 if self.ratio is None else self.ratio)).round().long()

    def cuts(self, depth: int, visual: int) -> list[Cut]:
        return []

    def named_layers(self, depth: int) -> tuple[int, ...]:
        return ()

    @property
    def press(self) -> Press:
        raise NotImplementedError
