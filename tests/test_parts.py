"""The pure parts, without a model: selection, schedules and budgets, scorers, FLOPs formulas."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig

import mmtoken
from mmtoken.accounting.flops import exact_flops, paper_flops
from mmtoken.engine.select import select
from mmtoken.methods import FastV, PyramidDrop
from mmtoken.schedules import average_visual_tokens
from mmtoken.scorers.grid import coarse_to_fine


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_select_keeps_text_and_the_best_visual_tokens(data):
    batch = data.draw(st.integers(1, 4))
    length = data.draw(st.integers(1, 24))
    candidates = torch.tensor(
        data.draw(st.lists(st.lists(st.booleans(), min_size=length, max_size=length), min_size=batch, max_size=batch))
    )
    valid = candidates | torch.tensor(
        data.draw(st.lists(st.lists(st.booleans(), min_size=length, max_size=length), min_size=batch, max_size=batch))
    )
    scores = torch.rand(batch, length)
    keep = torch.tensor(data.draw(st.lists(st.integers(0, length), min_size=batch, max_size=batch)))
    local, kept_valid = select(scores, candidates, valid, keep)
    for row in range(batch):
        indices = local[row].tolist()
        assert indices == sorted(set(indices))
        kept = {i for i, ok in zip(indices, kept_valid[row].tolist(), strict=True) if ok}
        text = {i for i in range(length) if valid[row, i] and not candidates[row, i]}
        visual = kept - text
        assert text <= kept
        assert len(visual) == min(int(keep[row]), int(candidates[row].sum()))
        dropped = set(candidates[row].nonzero().flatten().tolist()) - visual
        if visual and dropped:
            assert min(scores[row, list(visual)]) >= max(scores[row, list(dropped)])
    widths = [
        int((valid[row] & ~candidates[row]).sum()) + min(int(keep[row]), int(candidates[row].sum()))
        for row in range(batch)
    ]
    assert local.shape[1] == max(widths)


def test_select_never_keeps_a_candidate_scored_minus_infinity():
    scores = torch.tensor([[0.0, float("-inf"), 1.0, float("-inf")]])
    local, valid = select(
        scores, torch.ones(1, 4, dtype=torch.bool), torch.ones(1, 4, dtype=torch.bool), torch.tensor([4])
    )
    assert local.tolist() == [[0, 2]] and valid.all()


def test_coarse_to_fine_keeps_the_stride_lattice():
    rows, columns = torch.meshgrid(torch.arange(24), torch.arange(24), indexing="ij")
    geometry = torch.stack([torch.zeros_like(rows), torch.zeros_like(rows), rows, columns], -1).reshape(1, -1, 4)
    top = coarse_to_fine(geometry)[0].topk(144).indices
    kept = geometry[0, top]
    assert (kept[:, 2] % 2 == 0).all() and (kept[:, 3] % 2 == 0).all()
    quadrants = torch.bincount((kept[:, 2] // 12) * 2 + kept[:, 3] // 12, minlength=4)
    top64 = geometry[0, coarse_to_fine(geometry)[0].topk(64).indices]
    quadrants64 = torch.bincount((top64[:, 2] // 12) * 2 + top64[:, 3] // 12, minlength=4)
    assert quadrants.tolist() == [36] * 4
    assert quadrants64.min() >= 14


@pytest.mark.parametrize("budget", [192, 128, 64])
def test_budgets_give_that_average_per_layer(budget):
    for method in (FastV(k=2, budget=budget), FastV(k=3, budget=budget), PyramidDrop(layers=(2, 8, 16), budget=budget)):
        cuts = method.cuts(32, 576)
        assert average_visual_tokens(cuts, 32, 576) == pytest.approx(budget, abs=1.0)


def test_pdrop_budget_below_its_first_stage_is_unreachable():
    with pytest.raises(ValueError, match=r"budget 128 is unreachable with this schedule: the lowest is 144\.0"):
        PyramidDrop(budget=128).cuts(32, 576)


def test_pdrop_default_schedule_halves_each_stage():
    assert [(cut.layer, cut.keep) for cut in PyramidDrop().cuts(32, 576)] == [(8, 288), (16, 144), (24, 72)]


def test_list_methods_names_parameters_stage_and_paper():
    listed = {entry["name"]: entry for entry in mmtoken.list_methods()}
    assert set(listed) == {"fastv", "pdrop", "random", "uniform", "pooling"} | {
        "visionzip",
        "divprune",
        "tome",
        "aim",
        "holitom",
        "temporal",
    }
    assert listed["fastv"]["parameters"] == {"keep": None, "ratio": None, "budget": None, "k": 2}
    assert listed["pdrop"]["parameters"]["layers"] == (8, 16, 24)
    assert listed["pdrop"]["stage"] == "at_layer" and listed["random"]["stage"] == "before_llm"
    assert all(entry["paper"].startswith("arXiv") for entry in listed.values())


VICUNA_7B = LlamaConfig(
    hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32
)


@pytest.mark.parametrize(
    ("kept_at_layer", "paper_ratio"),
    [({0: 192}, 0.389), ({0: 128}, 0.289), ({0: 64}, 0.190), ({2: 288}, 0.568), ({2: 144}, 0.357)],
)
def test_paper_formula_reproduces_the_published_ratios(kept_at_layer, paper_ratio):
    """LLaVA-1.5-7B with 576 visual and 60 text tokens: the FLOPs ratios the papers print."""
    ((layer, keep),) = kept_at_layer.items()
    tokens = [636] * layer + [60 + keep] * (32 - layer)
    full = [636] * 32
    assert paper_flops(tokens, VICUNA_7B) / paper_flops(full, VICUNA_7B) == pytest.approx(paper_ratio, abs=0.002)
    exact = exact_flops(tokens, VICUNA_7B) / exact_flops(full, VICUNA_7B)
    assert exact == pytest.approx(paper_ratio, abs=0.01)


def test_exact_formula_counts_gated_mlp_and_grouped_kv():
    config = LlamaConfig(
        hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1
    )
    n = 3
    projections = 2 * n * 8 * (2 * 8 + 2 * 4)
    attention = 2 * 2 * 8 * (1 + 2 + 3)
    mlp = 2 * 3 * n * 8 * 16
    assert exact_flops([n], config) == projections + attention + mlp


def test_kernels_package_does_not_fool_transformers():
    from transformers.utils import is_kernels_available

    assert not is_kernels_available()
