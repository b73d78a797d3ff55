"""No host round trips: every method whose budget fixes its counts scores, selects and reduces on meta tensors.

A meta tensor has a shape and no values, so every step that reads a value on the host (`.item()`, `.tolist()`,
`nonzero`, indexing with a boolean mask, a copy to the CPU) raises on it, exactly where on a GPU it would make the
host wait for the device. The methods that decide their own counts (ATP, HoliTom, temporal merging, pooling,
FEATHER's lattice) must read those counts; the engine counts them after their cut, and graphs leave them eager.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from mmtoken.engine.select import select
from mmtoken.methods.registry import METHODS
from mmtoken.scorers.base import ScoreInput, decides_count

BATCH, LENGTH, VISUAL, KEEP = 2, 40, 32, 8
NEEDS_ARGUMENTS = {"gsearch", "pipeline"}  # built from a search result or from other methods, covered through those


def _meta_inputs(layer: torch.nn.Module) -> ScoreInput:
    meta = torch.device("meta")
    candidates = torch.zeros(BATCH, LENGTH, dtype=torch.bool, device=meta)
    cos, sin = torch.empty(BATCH, LENGTH, 16, device=meta), torch.empty(BATCH, LENGTH, 16, device=meta)
    geometry = torch.empty(BATCH, LENGTH, 4, dtype=torch.long, device=meta)
    return ScoreInput(
        torch.empty(BATCH, LENGTH, 64, device=meta),
        layer,
        (cos, sin),
        candidates,
        torch.ones_like(candidates),
        lambda: geometry,
        kinds=torch.zeros(BATCH, LENGTH, dtype=torch.long, device=meta),
        weight=torch.ones(BATCH, LENGTH, device=meta),
        keep=[KEEP] * BATCH,
        visual_counts=[VISUAL] * BATCH,
        measure=lambda: torch.empty(BATCH, LENGTH, device=meta),
    )


def _fixed_count_cuts():
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    for name, cls in sorted(METHODS.items()):
        if name in NEEDS_ARGUMENTS:
            continue
        method = cls()
        for cut in method.cuts(8, VISUAL):
            scorer = cut.scorer or method.scorer
            if not decides_count(scorer):
                yield pytest.param(config, scorer, cut.reducer or method.reducer, id=f"{name}-{type(scorer).__name__}")


@pytest.mark.parametrize(("config", "scorer", "reducer"), list(_fixed_count_cuts()))
def test_a_fixed_count_cut_never_reads_a_value_on_the_host(config, scorer, reducer):
    with torch.device("meta"):
        layer = LlamaDecoderLayer(config, 0)
    inputs = _meta_inputs(layer)
    scores = scorer.score(inputs)
    assert scores.shape == (BATCH, LENGTH)
    keep = torch.full((BATCH,), KEEP, device="meta")
    local, valid = select(scores, inputs.candidates, inputs.valid, keep, LENGTH - VISUAL + KEEP)
    hidden, weight = reducer.reduce(inputs.hidden, local, valid, inputs)
    assert hidden.shape == (BATCH, LENGTH - VISUAL + KEEP, 64) and weight.shape == (BATCH, LENGTH - VISUAL + KEEP)


def test_meta_tensors_do_refuse_a_read_on_the_host():
    with pytest.raises((RuntimeError, NotImplementedError)):
        torch.ones(3, device="meta").nonzero()
    with pytest.raises(RuntimeError):
        int(torch.ones(3, device="meta").sum())
