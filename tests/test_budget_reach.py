"""The papers' budgets on probe-llava-v2's 24 layers: every method that takes a budget reaches 192, 128 and 64
visual tokens per layer with its paper's schedule shape (the model's METHOD_DEFAULTS, or the same shape started
earlier where those cannot reach the budget), and averages what it was asked for."""

from __future__ import annotations

from functools import cache

import pytest
import torch

import mmtoken
from mmtoken.methods.registry import METHODS
from mmtoken.zoo import world
from mmtoken.zoo.embedded import LOW_BUDGET_DEFAULTS, METHOD_DEFAULTS, method_parameters, prompts
from mmtoken.zoo.recipes import RECIPES

MODEL = "probe-llava-v2"
BUDGETS = (192, 128, 64)
# methods whose budget is not an average over layers of a fixed count: pooling picks a grid (576 / 4 = 144,
# 576 / 9 = 64), ATP-LLaVA's cuts adapt to each instance's scores
APPROXIMATE = {"pooling", "atp"}
NOT_IMAGE_BUDGETS = {"temporal": "merges across video frames", "gsearch": "takes its per-layer counts (`keep`)",
                     "pipeline": "runs the budgets of its stages"}  # fmt: skip


def budget_methods() -> list[str]:
    return sorted(name for name, cls in METHODS.items()
                  if "budget" in cls.__dataclass_fields__ and name not in NOT_IMAGE_BUDGETS)  # fmt: skip


@cache
def model_and_inputs():
    torch.manual_seed(0)
    model, processor = RECIPES[MODEL]()
    return model.eval(), prompts(processor, world.generate("image", 2, seed=0, task="color"))


def test_the_methods_that_take_a_budget_are_the_papers():
    assert {"fastv", "pdrop", "feather", "atp", "holitom", "visionzip", "divprune", "tome", "aim", "pmod",
            "psigmoid", "random", "uniform", "pooling"} <= set(budget_methods())  # fmt: skip


@pytest.mark.parametrize("method", budget_methods())
def test_every_method_reaches_the_papers_budgets(method):
    model, inputs = model_and_inputs()
    depth, visual = model.config.text_config.num_hidden_layers, model.config.image_seq_length
    assert depth == 24 and visual == 576
    for budget in BUDGETS:
        parameters = method_parameters(MODEL, method, budget, depth, visual)
        with mmtoken.patched(model, method, budget=budget, **parameters) as handle, torch.no_grad():
            model(**inputs)
            average = handle.stats.avg_visual_tokens
        if method == "pooling":  # the grid nearest the budget: 2 x 2 cells at 192 and 128, 3 x 3 at 64
            assert average == min((144, 64), key=lambda grid: abs(grid - budget))
        elif method not in APPROXIMATE:
            assert abs(average - budget) <= 0.02 * budget, (budget, parameters, average)


def test_the_low_budget_shape_is_used_only_below_what_the_defaults_reach():
    low = LOW_BUDGET_DEFAULTS[MODEL]
    assert method_parameters(MODEL, "pdrop", 192, 24, 576) == METHOD_DEFAULTS[MODEL]["pdrop"] == {"layers": (6, 12, 18)}
    assert method_parameters(MODEL, "pdrop", 64, 24, 576) == low["pdrop"] == {"layers": (2, 6, 12)}
    assert method_parameters(MODEL, "pmod", 128, 24, 576) == {}
    assert method_parameters(MODEL, "pmod", 64, 24, 576) == {"lowest": 0.05}
    assert method_parameters("probe-llava", "pdrop", 64, 6, 576) == {"layers": (1, 2, 4)}  # v1 keeps its rows
