"""The main job refuses to report garbage: its unpatched rows are checked against the model card's floor."""

from __future__ import annotations

import pytest
from conftest import probe_llava

from mmtoken.compare import BrokenMeasurement, check_unpatched, compare
from mmtoken.zoo.card import blanked
from mmtoken.zoo.embedded import accuracy, answers, probe_samples, prompts


def _unpatched_row(samples) -> dict[str, float]:
    model, processor = probe_llava()
    return accuracy(samples, answers(model, processor, prompts(processor, samples)))


def test_unpatched_rows_at_the_model_cards_level_pass():
    row = _unpatched_row(probe_samples("probe-llava", per_task=8, seed=11))
    check_unpatched(row, "probe-llava")
    assert row["average"] >= 80


def test_unpatched_rows_far_below_the_floor_stop_the_job_and_name_the_likely_cause():
    row = _unpatched_row([blanked(sample) for sample in probe_samples("probe-llava", per_task=8, seed=11)])
    with pytest.raises(BrokenMeasurement, match=r"far below its model card's 90% floor.*transformers release"):
        check_unpatched(row, "probe-llava")


def test_the_main_job_writes_its_table_and_plot(tmp_path):
    rows = compare(per_task=1, seed=3, out=tmp_path)
    assert {row["method"] for row in rows} >= {"unpatched", "fastv"}
    assert "| unpatched |" in (tmp_path / "compare.md").read_text()
    assert (tmp_path / "compare.png").stat().st_size > 10_000
