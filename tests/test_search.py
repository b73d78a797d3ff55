"""Searched schedules on the trained probe model: found on one probe seed, they hold on a fresh one."""

from __future__ import annotations

import pytest
import yaml
from conftest import probe_llava

import mmtoken
from mmtoken.cli import main
from mmtoken.search import Calibration
from mmtoken.zoo.embedded import probe_samples

TOLERANCE = 10.0  # accuracy points, on the calibration set and again on the fresh one


def test_g_search_schedule_found_on_one_seed_holds_on_a_fresh_seed(tmp_path):
    """`mmtoken search gsearch` on 8 samples per reliable task of seed 0 writes a schedule that loses at most
    TOLERANCE points there; loaded from its YAML, it loses at most TOLERANCE points on 12 fresh samples per task
    of seed 1 too, while keeping at least 10% fewer visual tokens."""
    out = tmp_path / "gsearch.yaml"
    main(["search", "gsearch", "--per-task", "8", "--seed", "0", "--steps", "4", "--tolerance", str(TOLERANCE),
          "--out", str(out)])  # fmt: skip
    written = yaml.safe_load(out.read_text())
    assert written["method"] == "gsearch" and len(written["keep"]) == 6
    assert written["keep"] == sorted(written["keep"], reverse=True) and written["keep"][0] == 576
    model, processor = probe_llava()
    fresh = Calibration(model, processor, probe_samples("probe-llava", per_task=12, seed=1))
    unpatched, _ = fresh.evaluate(None)
    searched, visual = fresh.evaluate(mmtoken.methods.build(str(out)))
    assert searched >= unpatched - TOLERANCE
    assert visual <= 0.9 * 576


def test_p_sigmoid_search_writes_its_best_trial_at_the_budget(tmp_path):
    out = tmp_path / "psigmoid.yaml"
    main(["search", "psigmoid", "--per-task", "4", "--budget", "300", "--trials", "2", "--out", str(out)])
    written = yaml.safe_load(out.read_text())
    assert written["method"] == "psigmoid" and written["budget"] == 300
    assert 0 <= written["floor"] <= 1 and written["slope"] > 0
    header = [line for line in out.read_text().splitlines() if line.startswith("# calibration accuracy")]
    model, processor = probe_llava()
    calibration = Calibration(model, processor, probe_samples("probe-llava", per_task=4, seed=0))
    unpatched, _ = calibration.evaluate(None)
    accuracy, visual = calibration.evaluate(mmtoken.methods.build(str(out)))
    assert header == [f"# calibration accuracy {accuracy:.1f}% (unpatched {unpatched:.1f}%), {visual:.1f} visual "
                      "tokens per layer on average"]  # fmt: skip
    assert visual == pytest.approx(300, abs=1.0)
