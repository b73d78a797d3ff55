"""A method is a preset of parts: a schedule of cuts, a scorer (what to keep) and a reducer (how the rest
leaves). Presets declare their parameters as dataclass fields and check them in `__post_init__`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mmtoken.reducers import Drop, GroupMean, Reducer
from mmtoken.schedules import Cut, single_cut_keep
from mmtoken.schedules.curves import curve_cuts
from mmtoken.scorers import LastQueryAttention, Scorer
from mmtoken.scorers.groups import GroupHeads, Grouping

BEFORE_LLM, AT_LAYER = "before_llm", "at_layer"
BEFORE_AND_AT_LAYER = f"{BEFORE_LLM}+{AT_LAYER}"


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


def check_layers_fit(name: str, layers: tuple[int, ...], depth: int) -> None:
    if layers[-1] >= depth:
        raise ValueError(f"{name}: layer {layers[-1]} is past the model's {depth} decoder layers")


def merge_cut(layer: int, keep: int, grouping: Grouping) -> Cut:
    """A cut at `layer` that keeps the heads of `grouping`'s groups, each the weighted mean of its group."""
    return Cut(layer, keep, GroupHeads(grouping), GroupMean(grouping))


@dataclass
class Method:
    """Base of every method: `cuts(depth, visual)` says where and how many, `scorer` what, `reducer` how (for the
    cuts that name no scorer or reducer of their own). `needs_vision` asks the engine to record the vision encoder's
    attention (`ScoreInput.vision_signal`)."""

    name: ClassVar[str]
    paper: ClassVar[str]
    stage: ClassVar[str]
    needs_vision: ClassVar[bool] = False

    def cuts(self, depth: int, visual: int) -> list[Cut]:
        raise NotImplementedError

    @property
    def scorer(self) -> Scorer:
        raise NotImplementedError

    @property
    def reducer(self) -> Reducer:
        return Drop()

    def check_depth(self, depth: int) -> None:
        """Raise if the schedule names a layer the model does not have."""

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
        given = [name for name in ("keep", "ratio", "budget") if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(f"{self.name}: give one of keep, ratio, budget, not {' and '.join(given)}")
        if self.keep is not None and self.keep < 0:
            raise ValueError(f"{self.name}: keep must be >= 0, got {self.keep}")
        if self.ratio is not None:
            check_ratio(self.ratio)
        if self.budget is not None:
            check_budget(self.budget)

    def check_depth(self, depth: int) -> None:
        if self.cut_layer >= depth:
            raise ValueError(f"{self.name}: layer {self.cut_layer} is past the model's {depth} decoder layers")

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

    def cuts(self, depth: int, visual: int) -> list[Cut]:
        return curve_cuts(self.shares(depth, visual), visual)

    @property
    def scorer(self) -> Scorer:
        return LastQueryAttention(layer_offset=0)
