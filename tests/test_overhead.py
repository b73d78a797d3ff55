"""The method-overhead harness on the CPU, at a tiny size: one row per cut of every method at every budget."""

from __future__ import annotations

from mmtoken.evaluation.overhead import markdown, measure
from mmtoken.methods import build
from mmtoken.state import IMAGE, VIDEO

TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 8,
        "num_attention_heads": 4, "num_key_value_heads": 2}  # fmt: skip


def test_every_cut_of_every_method_gets_a_time_and_its_planned_count():
    methods = ["fastv", "divprune", "aim", "pooling"]
    rows = measure("tiny", [1, 2], methods, (0.25,), repeats=2, device="cpu", spec=(TINY, IMAGE, 1, 6))
    for method in methods:
        cuts = build(method, budget=9).cuts(8, 36)
        timed = [row for row in rows if row["setting"].startswith(method) and row["batch"] == 2]
        assert [(row["layer"], row["keep"]) for row in timed] == [(cut.layer, round(cut.keep)) for cut in cuts]
        assert all(row["eager_ms"] > 0 and row["graphed_ms"] is None for row in timed)
    assert "| tiny | 1 | fastv K=2 @9 | 0 (2, 0) |" in markdown(rows)


def test_a_budget_a_method_cannot_reach_is_a_row_that_says_so():
    rows = measure("tiny", [1], ["pdrop"], (0.01,), repeats=1, device="cpu", spec=(TINY, IMAGE, 1, 6))
    assert len(rows) == 1 and "skipped" in rows[0]


def test_video_methods_time_their_merges_over_frames():
    deep = TINY | {"num_hidden_layers": 24}
    rows = measure("tiny", [1], ["holitom", "temporal"], (0.25,), repeats=1, device="cpu", spec=(deep, VIDEO, 4, 3))
    assert [(row["setting"].split()[0], row["layer"]) for row in rows] == [("holitom", 0), ("holitom", 18),
                                                                          ("temporal", 0)]  # fmt: skip
    assert all(row["eager_ms"] > 0 for row in rows)
