"""The parts of the before-the-LLM and merging methods, without a model: weighted merges, DivPrune's diverse pick,
ToMe's matching, VisionZip's contextual tokens, density peaks, HoliTom's temporal segmentation, AIM's schedule."""

from __future__ import annotations

import math

import pytest
import torch

from mmtoken.methods import AIM, HoliTom, ToMe, VisionZip
from mmtoken.ops import merge_into, scatter_sum
from mmtoken.reducers import GroupMean, NearestMerge
from mmtoken.schedules import average_visual_tokens
from mmtoken.scorers.base import ScoreInput
from mmtoken.scorers.bipartite import BipartiteMerge, bipartite_targets
from mmtoken.scorers.contextual import dominant_contextual_targets
from mmtoken.scorers.density import density_peak_targets
from mmtoken.scorers.diversity import max_min_order
from mmtoken.scorers.groups import GroupHeads
from mmtoken.scorers.holitom import holitom_targets
from mmtoken.scorers.temporal import removable, segments, temporal_targets
from mmtoken.state import VIDEO


def _score_input(hidden: torch.Tensor, weight: torch.Tensor, keep: list[int]) -> ScoreInput:
    """Every token of every row a candidate, as at a cut before the language model of an all-visual prompt."""
    every = torch.ones(hidden.shape[:2], dtype=torch.bool)
    return ScoreInput(
        hidden,
        None,
        None,
        every,
        every.clone(),
        lambda: None,
        weight=weight,
        keep=keep,
        visual_counts=[hidden.shape[1]] * len(hidden),
    )


def test_merge_into_takes_weighted_means_and_leaves_singletons_bit_for_bit():
    hidden = torch.randn(1, 4, 3)
    weight = torch.tensor([[3.0, 1.0, 2.0, 5.0]])
    merged, total = merge_into(hidden, weight, torch.tensor([[1, 1, 2, -1]]))
    assert torch.allclose(merged[0, 1], (3 * hidden[0, 0] + hidden[0, 1]) / 4)
    assert torch.equal(merged[0, 2], hidden[0, 2]) and torch.equal(merged[0, 3], hidden[0, 3])
    assert total[0, 1] == 4 and total[0, 2] == 2


@pytest.mark.parametrize("trailing", [(), (5,), (3, 4)])
def test_scatter_sum_adds_each_slots_values_in_any_order_to_the_same_bits(trailing):
    """Each slot's sum equals scatter_add's (float64 reference), and shuffling the values leaves every bit as it was:
    what makes a merge the same from run to run on a GPU, where scatter_add's order is its threads'."""
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(2, 300, *trailing, generator=generator) * 100
    index = torch.randint(0, 7, (2, 300), generator=generator)
    index[1] = index[1].clamp(max=4)  # slots no value reaches sum to 0
    summed = scatter_sum(values, index, 8)
    shape = (*index.shape, *[1] * len(trailing))
    expected = torch.zeros(2, 8, *trailing, dtype=torch.float64)
    expected.scatter_add_(1, index.view(shape).expand_as(values), values.double())
    torch.testing.assert_close(summed, expected.float(), rtol=0, atol=0)
    assert summed.dtype == torch.float32 and not summed[1, 5:].any()
    shuffled = torch.randperm(300, generator=generator)
    assert torch.equal(scatter_sum(values[:, shuffled], index[:, shuffled], 8), summed)


def test_max_min_order_picks_the_isolated_token_then_one_per_cluster():
    directions = torch.eye(3)
    noise = 0.01 * torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 2.0], [2.0, 0.0, 1.0]])
    x_cluster, y_cluster = directions[0] + noise, directions[1] + noise.flip(0)
    features = torch.cat([x_cluster, y_cluster, directions[2:]])  # 3 near-copies of x, 3 of y, one lonely z
    order = max_min_order(features[None], torch.ones(1, 7, dtype=torch.bool), 3)[0].tolist()
    assert order[0] == 6
    assert {index // 3 for index in order[1:]} == {0, 1}
    chosen = features[order]
    unit = torch.nn.functional.normalize(chosen, dim=-1)
    assert (1 - unit @ unit.T + 2 * torch.eye(3)).min() > 0.9  # pairwise far apart: no two from one cluster


def _greedy_max_min(features: torch.Tensor, count: int) -> list[int]:
    """The max-min greedy order written out one pick at a time, as the DivPrune paper states it."""
    unit = torch.nn.functional.normalize(features.double(), dim=-1)
    distance = 1 - unit @ unit.T
    isolation = [
        min((distance[i, j] for j in range(len(features)) if j != i), default=math.inf) for i in range(len(features))
    ]
    picked = [max(range(len(features)), key=lambda i: isolation[i])]
    while len(picked) < min(count, len(features)):
        rest = [i for i in range(len(features)) if i not in picked]
        picked.append(max(rest, key=lambda i: min(distance[i, j] for j in picked)))
    return picked


@pytest.mark.parametrize("seed", range(4))
def test_max_min_order_of_a_batch_equals_the_greedy_pick_of_each_row(seed):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(3, 12, 5, generator=generator)
    candidates = torch.rand(3, 12, generator=generator) < 0.6
    candidates[2] = False
    candidates[2, 4] = True  # a row with one candidate runs out after it
    order = max_min_order(features, candidates, 6)
    for row in range(3):
        index = candidates[row].nonzero().squeeze(1)
        expected = index[_greedy_max_min(features[row, index], 6)].tolist()
        assert order[row].tolist() == expected + [-1] * (6 - len(expected))


def test_bipartite_matching_merges_the_most_similar_pairs_weighted_by_size():
    a, b, c = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([-1.0, 0.2])
    features = torch.stack([a, a * 1.1, b, b * 0.9 + 0.01 * a, c])  # sets A = 0, 2, 4 and B = 1, 3
    sizes = torch.tensor([3.0, 1.0, 1.0, 1.0, 1.0])
    target = bipartite_targets(features[None], sizes[None], keep=3)[0]
    assert target.tolist() == [1, 1, 3, 3, 4]
    inputs = _score_input(features[None], sizes[None], [3])
    grouping = BipartiteMerge()
    kept = (GroupHeads(grouping).score(inputs)[0] == 0).nonzero().flatten()
    merged, weight = GroupMean(grouping).reduce(features[None], kept[None], torch.ones(1, 3, dtype=torch.bool), inputs)
    assert torch.allclose(merged[0, 0], (3 * features[0] + features[1]) / 4)
    assert weight[0].tolist() == [4.0, 2.0, 1.0]


@pytest.mark.parametrize("keep", [1, 2, 5, 9])
def test_bipartite_rounds_reach_the_kept_count_and_conserve_weight(keep):
    features, sizes = torch.randn(17, 4), torch.rand(17) + 0.5
    target = bipartite_targets(features[None], sizes[None], keep)[0]
    heads = (target == torch.arange(17)).nonzero().flatten()
    assert len(heads) == keep and torch.isin(target, heads).all()
    _, weight = merge_into(features[None], sizes[None], target[None])
    assert torch.isclose(weight[0, heads].sum(), sizes.sum())


def test_bipartite_rounds_of_a_batch_equal_each_row_alone():
    features, sizes = torch.randn(4, 23, 5), torch.rand(4, 23) + 0.5
    together = bipartite_targets(features, sizes, 6)
    for row in range(4):
        assert torch.equal(together[row], bipartite_targets(features[row : row + 1], sizes[row : row + 1], 6)[0])


def test_visionzip_keeps_dominant_tokens_and_merges_the_rest_into_evenly_spaced_seeds():
    signal = torch.tensor([0.0, 9.0, 0.0, 0.0, 8.0, 0.0, 0.0, 0.0])
    features = torch.tensor([[1.0, 0], [0, 1], [1, 0.1], [0, 1], [1, 1], [0.1, 1], [1, 0], [0, 1]])
    target = dominant_contextual_targets(signal, features, dominant=2, contextual=2)
    rest = [0, 2, 3, 5, 6, 7]  # seeds every third of the rest: 0 (along x) and 5 (along y)
    assert target[[1, 4]].tolist() == [1, 4]
    assert target[rest].tolist() == [0, 0, 5, 5, 0, 5]


def test_density_peaks_put_one_center_in_each_blob():
    torch.manual_seed(0)
    blobs = torch.cat([torch.randn(10, 2) * 0.05, torch.randn(10, 2) * 0.05 + 5])
    target = density_peak_targets(blobs, 2)
    assert len(target.unique()) == 2
    assert (target[:10] < 10).all() and (target[10:] >= 10).all()


def test_removable_counts_the_places_similar_across_each_segment():
    torch.manual_seed(0)
    similar = torch.rand(6, 5) > 0.3
    counts = removable(similar)
    for start in range(7):
        for end in range(7):
            lasting = int(similar[start:end].all(0).sum()) if end > start else 0
            assert counts[start, end] == lasting * (end - start)


def test_segmentation_merges_a_repeated_frame_into_its_first_showing():
    similar = torch.tensor([[False, False, True], [True, True, True], [False, True, False]])  # frames 1 and 2 equal
    assert segments(similar) == [(0, 0), (1, 2), (3, 3)]
    grid = torch.arange(12).view(4, 3)
    target = torch.arange(12)
    assert temporal_targets(grid, similar, target) == 3
    assert target.tolist() == [0, 1, 2, 3, 4, 5, 3, 4, 5, 9, 10, 11]


@pytest.mark.parametrize(("lasting", "expected"), [(3, [(0, 3)]), (2, [(0, 1), (2, 3)])])
def test_segmentation_is_global_not_greedy(lasting, expected):
    """Frames 0 = 1 and 2 = 3; `lasting` of 4 places also stay the same from 1 to 2. One segment over all four
    frames removes 3 x `lasting` tokens, two segments 4 + 4: the better split wins."""
    similar = torch.ones(3, 4, dtype=torch.bool)
    similar[1, lasting:] = False
    assert segments(similar) == expected


def test_holitom_merges_the_repeated_frame_then_keeps_its_share():
    torch.manual_seed(0)
    frames = torch.randn(4, 9, 8)
    frames[2] = frames[1]
    features = frames.reshape(36, 8)
    grid = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(3), torch.arange(3), indexing="ij"), -1)
    geometry = torch.cat([torch.zeros(36, 1, dtype=torch.long), grid.reshape(36, 3)], dim=1)
    kinds = torch.full((36,), VIDEO)
    signal = torch.rand(36)
    whole = holitom_targets(features, torch.ones(36), signal, geometry, kinds, ratio=1.0, threshold=0.99)
    assert whole[18:27].tolist() == list(range(9, 18)) and (whole[:18] == torch.arange(18)).all()
    target = holitom_targets(features, torch.ones(36), signal, geometry, kinds, ratio=0.5, threshold=0.99)
    heads = (target == torch.arange(36)).nonzero().flatten()
    share = 0.5 * 36 / 27  # a quarter went in the temporal merge
    assert len(heads) == 2 * math.ceil(9 * share) + round(9 * share) == 18  # frames 0 and 3 dynamic, 1-2 static
    first_frame_kept = heads[heads < 9]
    assert torch.equal(first_frame_kept.sort().values, signal[:9].topk(6).indices.sort().values)


def test_nearest_merge_folds_each_dropped_token_into_its_most_similar_kept_one():
    hidden = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9], [5.0, 5.0]]])
    inputs = _score_input(hidden, torch.ones(1, 5), [2])
    inputs.candidates[0, 4] = False  # a text token: never merges
    # token 3 only fills the row (invalid): it merges away like token 2, it does not absorb
    local, valid = torch.tensor([[0, 1, 3, 4]]), torch.tensor([[True, True, False, True]])
    merged, weight = NearestMerge().reduce(hidden, local, valid, inputs)
    assert torch.allclose(merged[0, 0], (hidden[0, 0] + hidden[0, 2]) / 2)
    assert torch.allclose(merged[0, 1], (hidden[0, 1] + hidden[0, 3]) / 2)
    assert torch.equal(merged[0, 3], hidden[0, 4]) and weight[0, [0, 1, 3]].tolist() == [2.0, 2.0, 1.0]


@pytest.mark.parametrize("budget", [192, 128, 64])
def test_aim_budget_solves_for_its_merge_ratio(budget):
    cuts = AIM(budget=budget).cuts(32, 576)
    assert cuts[0].layer == 0 and [cut.layer for cut in cuts[1:]] == list(range(16, 24))
    assert cuts[-1].keep == 0
    assert average_visual_tokens(cuts, 32, 576) == pytest.approx(budget, abs=1.0)


def test_holitom_budget_plans_its_inner_merge_from_the_outer_count():
    cuts = HoliTom(budget=64, layer=18, merge=0.5).cuts(28, 576)
    outer = 64 * 28 / (18 + 10 * 0.5)
    assert [(cut.layer, cut.keep) for cut in cuts] == [(0, 576), (18, round(outer / 2))]


def test_presets_with_the_same_budget_keep_the_same_count_before_the_language_model():
    for method in (ToMe(budget=100), VisionZip(budget=100)):
        assert [(cut.layer, cut.keep) for cut in method.cuts(32, 576)] == [(0, 100)]
