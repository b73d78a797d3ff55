"""Methods in a row: each stage cuts after the stage before it and sees its survivors."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

from mmtoken.methods.base import BEFORE_LLM, ON_CACHE, Examples, Method, check_budget
from mmtoken.methods.registry import build, register

COMPOSED = "composed"


@register
@dataclass
class Pipeline(Method):
    """Several methods applied one after the other, e.g. pooling before the language model, then PyramidDrop
    inside it: `{"method": "pipeline", "stages": [{"method": "pooling"}, {"method": "pdrop", "layers": [2, 8]}]}`.

    Each stage is a method (a name, a dict or a Method) with its own parameters; its cuts come after the last cut
    of the stage before (stages before the language model may share layer 0), and its schedule is planned for the
    visual tokens that stage leaves. `budget` goes to the last stage, whose average then is the pipeline's: so all
    stages before it must cut before the language model.
    """

    name: ClassVar[str] = "pipeline"
    paper: ClassVar[str] = "its stages' papers"
    stage: ClassVar[str] = COMPOSED
    examples: ClassVar[Examples] = Examples(
        too_deep={"stages": ({"method": "pooling", "stride": 2}, {"method": "pdrop", "layers": (2, 6)})},
        # merging (whose count the merge decides) and an inner merge, then pruning planned on the survivors
        cutting={"stages": ({"method": "holitom", "ratio": 0.5, "layer": 2}, {"method": "pdrop", "layers": (3, 5)})},
        keep_all={"stages": ({"method": "pooling", "stride": 1}, {"method": "pdrop", "layers": (2, 4), "ratio": 1.0})},
    )
    stages: tuple = ()
    budget: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.stages:
            raise ValueError("pipeline: give at least one stage")
        methods = [build(stage) for stage in self.stages]
        if self.budget is not None:
            check_budget(self.budget)
            if methods[-1].stage == ON_CACHE:
                last = methods[-1].name
                raise ValueError(f"pipeline: a budget goes to the last stage, and {last} keeps a share of the KV "
                                 "cache, not visual tokens: give the budget to the stage before it")  # fmt: skip
            inside = [method.name for method in methods[:-1] if method.stage != BEFORE_LLM]
            if inside:
                raise ValueError(
                    f"pipeline: a budget needs every stage but the last to cut before the language model; "
                    f"{', '.join(inside)} cut inside it: give each stage its own budget instead"
                )
            methods[-1] = replace(methods[-1], budget=self.budget)
        self._steps = [step for method in methods for step in method.steps]

    @property
    def steps(self) -> list[Method]:
        return self._steps

    def check_depth(self, depth: int) -> None:
        for step in self._steps:
            step.check_depth(depth)
