"""What the inside-the-LLM methods do beyond the shared invariants: FEATHER's lattice, ATP's per-row counts,
the curve schedules' counts, and pipelines that chain methods; and the registry that names every method."""

from __future__ import annotations

import pkgutil
from typing import ClassVar

import pytest
import torch
from conftest import greedy, greedy_logits, inputs, model_and_processor, probe_llava

import mmtoken
import mmtoken.engine.cutting
import mmtoken.methods
from mmtoken.methods import METHODS, FastV, PyramidDrop, register
from mmtoken.methods.base import CurveMethod
from mmtoken.schedules.curves import shifted_cosine, sigmoid
from mmtoken.zoo import probe
from mmtoken.zoo.embedded import answers, encode

POOL_THEN_PDROP = {"stages": [{"method": "pooling", "stride": 2}, {"method": "pdrop", "layers": (2, 4)}]}


def test_feather_keeps_the_lattice_and_the_best_others():
    """On LLaVA's 8 x 8 grid: the first cut keeps the 9 tokens of the stride-3 lattice plus round(0.3 * 64) = 19
    others, the second round(0.09 * 64) = 6 of them."""
    model, _ = model_and_processor("llava")
    with mmtoken.patched(model, "feather", layers=(2, 4), ratio=0.3) as handle:
        greedy(model, inputs("llava", False, batch=2))
        call = handle.latest_call
    assert handle.stats.visual_tokens_per_layer == [64, 64, 28, 28, 6, 6]
    early = call.set_at(2)
    geometry = call.geometry.gather(1, early.position[..., None].expand(-1, -1, 4))
    for row in range(2):
        visual = geometry[row][call.visual(early)[row]]
        lattice = {(r, c) for r, c in visual[:, 2:].tolist() if r % 3 == 0 and c % 3 == 0}
        assert len(lattice) == 9


def test_atp_keeps_a_count_of_its_own_per_image_and_reports_it():
    """On the trained probe model, images whose attention is spread differently keep different counts; a higher
    mass keeps more; a budget caps every cut; the stats give the budget achieved."""
    model, processor = probe_llava()
    samples = [sample for task in ("count", "color", "exist") for sample in probe.generate("image", 2, 3, task)]
    batch, encoded = encode(model, processor, samples)
    kept = {}
    for mass in (0.5, 0.9):
        with mmtoken.patched(model, "atp", layers=(1, 3), mass=mass) as handle:
            answers(model, processor, batch, max_new_tokens=1, encoded=encoded)
            counts = [handle.latest_call.set_at(layer).visual_counts for layer in range(6)]
        assert len(set(counts[1])) > 1
        assert handle.stats.visual_tokens_per_layer == [sum(row) / len(row) for row in counts]
        kept[mass] = counts
    assert all(a <= b for a, b in zip(kept[0.5][3], kept[0.9][3], strict=True)) and kept[0.5] != kept[0.9]
    caps = PyramidDrop(layers=(1, 3), budget=200).cuts(6, 576)
    with mmtoken.patched(model, "atp", layers=(1, 3), mass=0.9, budget=200) as handle:
        answers(model, processor, batch, max_new_tokens=1, encoded=encoded)
        for cap in caps:
            # the spatial sample comes on top of the cap
            assert max(handle.latest_call.set_at(cap.layer).visual_counts) <= cap.keep + round(0.1 * 576)
    assert handle.stats.avg_visual_tokens < 200 + 0.1 * 576


CURVES = [
    ("gsearch", {"keep": (64, 64, 40, 24, 24, 8), "visual": 64}, [64, 64, 40, 24, 24, 8]),
    ("psigmoid", {}, [round(64 * share) for share in sigmoid(6, 0.5, 12.0, 0.1)]),
    ("pmod", {}, [round(64 * share) for share in shifted_cosine(6, 0.5)]),
]


def test_every_module_of_the_package_registers_a_method():
    """A new method is one file: the package imports each of its modules, whose class `@register` records."""
    modules = {module.name for module in pkgutil.iter_modules(mmtoken.methods.__path__)} - {"base", "registry"}
    assert {cls.__module__.rpartition(".")[2] for cls in METHODS.values()} == modules
    assert all(getattr(mmtoken.methods, cls.__name__) is cls for cls in METHODS.values())


def test_a_method_name_is_registered_once():
    class Again(FastV):
        name: ClassVar[str] = "fastv"

    with pytest.raises(ValueError, match=r"method name 'fastv' is taken by mmtoken\.methods\.fastv\.FastV"):
        register(Again)
    assert METHODS["fastv"] is FastV


def test_every_curve_method_is_checked_on_a_model():
    """The invariant tests leave the curve methods out (conftest): the test below must check each of them instead."""
    assert {name for name, cls in METHODS.items() if issubclass(cls, CurveMethod)} == {name for name, _, _ in CURVES}


@pytest.mark.parametrize(("method", "params", "per_layer"), CURVES)
def test_curve_schedules_keep_their_counts_and_batch_equals_rows(method, params, per_layer):
    model, _ = model_and_processor("llava")
    batch = inputs("llava", False, batch=2)
    with mmtoken.patched(model, method, **params) as handle:
        together = greedy_logits(model, batch)
        assert handle.stats.visual_tokens_per_layer == per_layer
        alone = torch.cat([greedy_logits(model, inputs("llava", False, rows=[row])) for row in range(2)])
    assert (together - alone).abs().max() < 1e-4


def test_pipeline_plans_each_stage_on_the_survivors_of_the_one_before():
    """Pooling 64 -> 16 tokens before the language model, then PyramidDrop halves those 16 at layers 2 and 4;
    the first stage's tokens are exactly pooling's alone."""
    model, _ = model_and_processor("llava")
    batch = inputs("llava", False, batch=2)
    with mmtoken.patched(model, "pooling", stride=2) as handle:
        greedy(model, batch)
        pooled = handle.latest_call.sets[0]
    with mmtoken.patched(model, "pipeline", **POOL_THEN_PDROP) as handle:
        greedy(model, batch)
        call = handle.latest_call
    assert handle.stats.visual_tokens_per_layer == [16, 16, 8, 8, 4, 4]
    assert torch.equal(call.sets[0].position, pooled.position)
    for deeper in (2, 4):
        kept = call.sets[deeper].position[call.visual(call.sets[deeper])]
        assert set(kept.tolist()) <= set(pooled.position[call.visual(pooled)].tolist())


def test_pipeline_of_a_merge_and_pruning_plans_pruning_on_the_merged_tokens():
    """HoliTom (an adaptive merge before the language model, an inner merge at layer 2) then PyramidDrop at layers
    3 and 5 on a video: HoliTom's tokens and merged states are its own alone, and PyramidDrop halves what it left."""
    model, _ = model_and_processor("qwen2_vl")
    batch = inputs("qwen2_vl", True, batch=2)
    holitom = {"method": "holitom", "ratio": 0.5, "layer": 2}
    with mmtoken.patched(model, holitom) as handle:
        greedy(model, batch)
        merged = handle.latest_call.sets
    with mmtoken.patched(model, "pipeline", stages=[holitom, {"method": "pdrop", "layers": (3, 5)}]) as handle:
        greedy(model, batch)
        sets = handle.latest_call.sets
    for layer in (0, 2):
        assert torch.equal(sets[layer].position, merged[layer].position)
        assert torch.equal(sets[layer].weight, merged[layer].weight)
    inner = merged[2].visual_counts
    assert sets[3].visual_counts == [round(count / 2) for count in inner]
    assert sets[5].visual_counts == [round(count / 4) for count in inner]


KEEP_ALL_PDROP = {"method": "pdrop", "layers": (2, 4), "ratio": 1.0}


@pytest.mark.parametrize(
    ("stages", "alone"),
    [
        (({"method": "pooling", "stride": 2}, KEEP_ALL_PDROP), ("pooling", {"stride": 2})),
        (({"method": "random", "ratio": 1.0}, {"method": "pdrop", "layers": (2, 4)}), ("pdrop", {"layers": (2, 4)})),
    ],
)
def test_pipeline_with_a_keep_all_stage_equals_the_other_stage_alone(stages, alone):
    model, _ = model_and_processor("llava")
    batch = inputs("llava", False, batch=2)
    with mmtoken.patched(model, alone[0], **alone[1]):
        expected = greedy_logits(model, batch)
    with mmtoken.patched(model, "pipeline", stages=stages):
        assert (greedy_logits(model, batch) - expected).abs().max() < 1e-5


def test_pipeline_budget_goes_to_the_last_stage_and_loads_from_yaml(tmp_path):
    model, _ = model_and_processor("llava")
    batch = inputs("llava", False, batch=2)
    path = tmp_path / "pipeline.yaml"
    path.write_text("method: pipeline\nbudget: 10\nstages:\n  - {method: pooling, stride: 2}\n"
                    "  - {method: pdrop, layers: [2, 4]}\n")  # fmt: skip
    with mmtoken.patched(model, str(path)) as handle:
        from_yaml = greedy(model, batch)
        assert handle.stats.avg_visual_tokens == pytest.approx(10, abs=0.5)
    with mmtoken.patched(model, {"method": "pipeline", "budget": 10, **POOL_THEN_PDROP}):
        assert torch.equal(greedy(model, batch), from_yaml)


@pytest.mark.parametrize(("method", "params"), [("fastv", {"k": 2, "ratio": 1.0}), ("visionzip", {"ratio": 1.0})])
def test_a_cut_that_keeps_every_token_is_skipped(method, params, monkeypatch):
    """No cut is made (no scoring, no gather) and no layer gets a token set of its own: keep-all costs only the
    hooks."""
    model, _ = model_and_processor("llava")
    batch = inputs("llava", False, batch=2)
    made = []
    monkeypatch.setattr(mmtoken.engine.cutting, "_cut", lambda *args: made.append(args))
    with mmtoken.patched(model, method, **params) as handle:
        greedy(model, batch)
        assert not made
        assert list(handle.latest_call.sets) == [0]
