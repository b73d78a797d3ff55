"""The pure parts, without a model: selection, schedules and budgets, scorers, FLOPs formulas."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig

import mmtoken
from mmtoken.accounting.flops import exact_flops, paper_flops
from mmtoken.engine.select import select
from mmtoken.methods import AdaptivePrune, FastV, Feather, GSearch, ProgressiveDecay, PSigmoid, PyramidDrop
from mmtoken.schedules import Cut, average_visual_tokens
from mmtoken.schedules.curves import shifted_cosine, sigmoid
from mmtoken.scorers import LastQueryAttention
from mmtoken.scorers.base import ScoreInput
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
    # keeping padding and fillers too: the same tokens valid, every other non-candidate kept beside them
    padded_local, padded_valid = select(scores, candidates, valid, keep, keep_invalid=True)
    for row in range(batch):
        indices = padded_local[row].tolist()
        assert {i for i in range(length) if not candidates[row, i]} <= set(indices)
        assert {i for i, ok in zip(indices, padded_valid[row].tolist(), strict=True) if ok} == {
            i for i, ok in zip(local[row].tolist(), kept_valid[row].tolist(), strict=True) if ok
        }
    others = [int((~candidates[row]).sum()) + min(int(keep[row]), int(candidates[row].sum())) for row in range(batch)]
    assert padded_local.shape[1] == max(others)


def test_select_never_keeps_a_candidate_scored_minus_infinity():
    scores = torch.tensor([[0.0, float("-inf"), 1.0, float("-inf")]])
    local, valid = select(
        scores, torch.ones(1, 4, dtype=torch.bool), torch.ones(1, 4, dtype=torch.bool), torch.tensor([4])
    )
    assert local.tolist() == [[0, 2]] and valid.all()


def test_select_keeps_candidates_scored_plus_infinity_on_top_of_the_count():
    scores = torch.tensor([[0.5, float("inf"), 0.9, 0.1, float("inf"), float("-inf")]])
    everything = torch.ones(1, 6, dtype=torch.bool)
    local, valid = select(scores, everything, everything, torch.tensor([1]))
    assert local.tolist() == [[1, 2, 4]] and valid.all()


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
    assert set(listed) == {"fastv", "pdrop", "random", "uniform", "pooling", "feather", "atp", "pmod", "gsearch",
                           "psigmoid", "visionzip", "divprune", "tome", "aim", "holitom", "temporal",
                           "pipeline", "snapkv", "valuenorm", "kvrandom", "kvrecency", "kvtemporal",
                           "bilevel", "h2o"}  # fmt: skip
    assert listed["fastv"]["parameters"] == {"keep": None, "ratio": None, "budget": None, "k": 2}
    assert listed["pdrop"]["parameters"]["layers"] == (8, 16, 24)
    assert listed["pdrop"]["stage"] == "at_layer" and listed["random"]["stage"] == "before_llm"
    assert listed["snapkv"]["stage"] == "on_cache" and listed["snapkv"]["parameters"]["window"] == 8
    assert all(
        entry["paper"].startswith("arXiv") for name, entry in listed.items() if name not in ("pipeline", "kvrandom")
    )


@pytest.mark.parametrize("budget", [192, 160])
def test_new_budgets_give_that_average_per_layer(budget):
    """FEATHER counts its lattice as N / 9 tokens, exact on LLaVA-1.5's 24 x 24 grid."""
    methods = [
        Feather(budget=budget),
        ProgressiveDecay(budget=budget),
        PSigmoid(budget=budget),
        GSearch(keep=(576,) * 4 + (288,) * 12 + (144,) * 8 + (0,) * 8, budget=budget),
    ]
    for method in methods:
        cuts = method.cuts(32, 576)
        if method.name == "feather":  # its first cut keeps the 8 x 8 lattice on top
            cuts[0] = Cut(cuts[0].layer, cuts[0].keep + 64)
        assert average_visual_tokens(cuts, 32, 576) == pytest.approx(budget, abs=1.0), method.name
        assert [cut.keep for cut in cuts] == sorted((cut.keep for cut in cuts), reverse=True)
    caps = AdaptivePrune(budget=budget).cuts(32, 576)
    assert average_visual_tokens(caps, 32, 576) == pytest.approx(budget, abs=1.0)


def test_feather_default_schedule_is_the_papers():
    """Layers 8 / 16; the first keeps 30% by attention on top of the stride-3 lattice, the second 0.3**2."""
    first, second = Feather().cuts(32, 576)
    assert (first.layer, first.keep, first.scorer.stride, second.layer, second.keep) == (8, 173, 3, 16, 52)
    assert second.scorer is None
    assert first.scorer.base == Feather().scorer == LastQueryAttention(layer_offset=-1, rope=False)


def test_pmod_decay_is_the_shifted_cosine():
    """p-MoD's default: shift 0.5, layers above 0.85 whole, nothing below 0.15, on a 32-layer model."""
    shares = shifted_cosine(32, 0.5)
    assert shares[:8] == [1.0] * 8 and shares[24:] == [0.15] * 8
    for layer in range(8, 24):
        assert shares[layer] == pytest.approx(0.5 + math.cos(math.pi * layer / 31) / 2)
    assert all(later < earlier for earlier, later in pairwise(shares[7:24]))
    cuts = ProgressiveDecay().cuts(32, 576)
    assert [cut.layer for cut in cuts] == list(range(8, 25))
    assert cuts[-1].keep == round(0.15 * 576)


def test_psigmoid_curve_falls_through_its_center():
    shares = sigmoid(20, center=0.5, slope=10.0, floor=0.2)
    assert shares[0] == 1.0 and shares[10] == pytest.approx(0.6)
    assert all(later < earlier for earlier, later in pairwise(shares[1:]))
    assert shares[19] == pytest.approx(0.2, abs=0.02)


def test_gsearch_schedule_scales_to_other_inputs():
    method = GSearch(keep=(576, 576, 288, 144, 144, 0))
    assert [(cut.layer, cut.keep) for cut in method.cuts(6, 576)] == [(2, 288), (3, 144), (5, 0)]
    assert [(cut.layer, cut.keep) for cut in method.cuts(6, 64)] == [(2, 32), (3, 16), (5, 0)]


def _reference_attention(layer, hidden, valid, rotary=None):
    """Head-averaged attention of the last token, one head and one key at a time."""
    attention, states = layer.self_attn, layer.input_layernorm(hidden)
    heads, kv_heads, dim = layer.self_attn.config.num_attention_heads, layer.self_attn.config.num_key_value_heads, 8
    batch, length, _ = hidden.shape
    result = torch.zeros(batch, length)
    for row in range(batch):
        for head in range(heads):
            query = attention.q_proj(states[row, -1])[head * dim : (head + 1) * dim]
            kv_head = head // (heads // kv_heads)
            keys = attention.k_proj(states[row])[:, kv_head * dim : (kv_head + 1) * dim]
            if rotary is not None:
                cos, sin = rotary
                query = query * cos[row, -1] + torch.cat([-query[dim // 2 :], query[: dim // 2]]) * sin[row, -1]
                keys = keys * cos[row] + torch.cat([-keys[:, dim // 2 :], keys[:, : dim // 2]], 1) * sin[row]
            logits = (keys @ query) / math.sqrt(dim)
            result[row] += logits.masked_fill(~valid[row], float("-inf")).softmax(0) / heads
    return result


@pytest.mark.parametrize("rope", [False, True])
def test_last_query_attention_equals_an_explicit_reference(rope):
    """FEATHER's RoPE-free score (and the rotary one) against attention written out head by head, with grouped
    query attention and a padded row."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=8, num_hidden_layers=1)  # fmt: skip
    layer = LlamaDecoderLayer(config, layer_idx=0).eval()
    hidden = torch.randn(2, 7, 32)
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[1, :2] = False
    positions = torch.arange(7).expand(2, -1) * 40
    rotary = LlamaRotaryEmbedding(config)(hidden, positions)
    inputs = ScoreInput(hidden, layer, rotary, valid, valid, lambda: None)
    with torch.no_grad():
        scores = LastQueryAttention(rope=rope).score(inputs)
        expected = _reference_attention(layer, hidden, valid, rotary if rope else None)
        other = LastQueryAttention(rope=not rope).score(inputs)
    assert (scores - expected).abs().max() < 1e-6
    assert (scores - other).abs().max() > 1e-3
    assert (scores[1, :2] == 0).all()


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
