"""How far a probe model's verdicts are from a real model's: each method's accuracy relative to the unpatched model
on the probe, beside the published relative accuracy of a real model at the same share of the visual tokens, with
the gap and the rank correlation (Spearman) per budget.

Images compare with LLaVA-1.5-7B (576 tokens; budgets 192 / 128 / 64), videos with LLaVA-OneVision-7B (32 frames of
196 tokens; 10 / 5 / 2 % of them). The published numbers are means over a benchmark suite (GQA, MMB, MME, POPE,
SQA, VQAv2, TextVQA and others for images; MVBench, EgoSchema, MLVU, LongVideoBench and VideoMME for videos) in %
of the unpatched model, from the sources named beside each. Where several papers report a method, the one that ran
the most methods in one environment is taken, since the same baseline differs by several points between papers
(FastV at 192 tokens: 87.9 to 96.5%).
"""

from __future__ import annotations

import itertools
import statistics
from dataclasses import dataclass


@dataclass(frozen=True)
class Published:
    """One published relative accuracy (% of the unpatched model) of `method` at `budget` visual tokens of `of`
    (the real model's 576 for LLaVA-1.5; 100 where a paper gives the share kept in %)."""

    method: str
    budget: float
    relative: float
    source: str
    of: int = 576

    @property
    def share(self) -> float:
        return self.budget / self.of


MMTOK, PDROP, WEN, UNIFIED = "MMTok", "PDrop", "Wen", "Unified"
SOURCES = {
    UNIFIED: "the main table of arXiv 2603.21957 (CVPR 2026, Unified Spatiotemporal Token Compression), LLaVA-OV-7B "
    "at 32 frames of 196 tokens, as quoted; its HoliTom rows match HoliTom's own abstract. FastV's share there is the "
    "share kept after its cut, not the average over layers",
    MMTOK: "MMTok's re-evaluation of FastV, VisionZip and DivPrune in one environment, as quoted from its table",
    PDROP: "PyramidDrop (CVPR 2025, arXiv 2410.17247), Table 2, as quoted",
    WEN: "Wen et al., Token Pruning in Multimodal LLMs (ACL Findings 2025, arXiv 2502.11501), Table 1, as quoted",
}

LLAVA15_7B: tuple[Published, ...] = (
    Published("fastv", 192, 89.6, MMTOK),
    Published("fastv", 128, 84.4, MMTOK),
    Published("fastv", 64, 75.6, MMTOK),
    Published("visionzip", 192, 97.9, MMTOK),
    Published("visionzip", 128, 96.8, MMTOK),
    Published("visionzip", 64, 93.2, MMTOK),
    Published("divprune", 192, 98.0, MMTOK),
    Published("divprune", 128, 97.0, MMTOK),
    Published("divprune", 64, 94.8, MMTOK),
    Published("pdrop", 192, 96.8, PDROP),
    Published("pdrop", 128, 95.6, PDROP),
    Published("pdrop", 64, 87.6, PDROP),
    Published("tome", 192, 89.9, PDROP),
    Published("tome", 64, 70.5, PDROP),
    Published("random", 64, 89.1, WEN),
)
ONEVISION_7B: tuple[Published, ...] = (
    Published("fastv", 10, 90.8, UNIFIED, of=100),
    Published("fastv", 5, 84.7, UNIFIED, of=100),
    Published("fastv", 2, 81.0, UNIFIED, of=100),
    Published("visionzip", 10, 91.2, UNIFIED, of=100),
    Published("visionzip", 5, 81.4, UNIFIED, of=100),
    Published("visionzip", 2, 75.3, UNIFIED, of=100),
    Published("holitom", 10, 98.3, UNIFIED, of=100),
    Published("holitom", 5, 94.0, UNIFIED, of=100),
    Published("holitom", 2, 87.7, UNIFIED, of=100),
)
REFERENCES = {"image": ("LLaVA-1.5-7B", LLAVA15_7B), "video": ("LLaVA-OneVision-7B", ONEVISION_7B)}


def ranks(values: list[float]) -> list[float]:
    """The rank of each value (1 for the smallest), ties given the mean of the ranks they share."""
    order = sorted(range(len(values)), key=values.__getitem__)
    out = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for place in order[start : end + 1]:
            out[place] = (start + end) / 2 + 1
        start = end + 1
    return out


def spearman(first: list[float], second: list[float]) -> tuple[float, float] | None:
    """Spearman's rho of two paired lists and its exact two-sided p-value (the share of all orderings of `second`
    whose |rho| is at least as large); None for fewer than 3 pairs or a list with a single value."""
    if len(first) < 3 or len(set(first)) < 2 or len(set(second)) < 2:
        return None

    def rho(a: list[float], b: list[float]) -> float:
        mean_a, mean_b = statistics.mean(a), statistics.mean(b)
        covariance = sum((x - mean_a) * (y - mean_b) for x, y in zip(a, b, strict=True))
        spread = (sum((x - mean_a) ** 2 for x in a) * sum((y - mean_b) ** 2 for y in b)) ** 0.5
        return covariance / spread

    a, b = ranks(first), ranks(second)
    observed = rho(a, b)
    orderings = list(itertools.permutations(b))
    extreme = sum(abs(rho(a, list(order))) >= abs(observed) - 1e-12 for order in orderings)
    return observed, extreme / len(orderings)


def compare(entries: list[dict], published: tuple[Published, ...]) -> list[dict]:
    """One row per published (method, share of the visual tokens) that the probe's `entries`
    (`mmtoken.evaluation.report.settings`) measured: the probe's relative accuracy and its 95% half-width, the
    published one, and the gap."""
    measured = {(entry["method"], round(entry["budget"] / entry["original_visual_tokens"], 6)): entry
                for entry in entries if entry.get("relative") is not None and entry["budget"] is not None}  # fmt: skip
    rows = []
    for point in published:
        entry = measured.get((point.method, round(point.share, 6)))
        if entry is not None:
            rows.append({"method": point.method, "budget": entry["budget"], "share": point.share,
                         "probe": entry["relative"], "probe_interval": entry.get("relative_interval"),
                         "published": point.relative, "gap": point.relative - entry["relative"],
                         "source": point.source})  # fmt: skip
    return rows


def markdown(model: str, rows: list[dict], reference: str) -> str:
    """The calibration table against the real model `reference` and, per budget, the mean |gap| and Spearman's rho
    over the methods measured."""
    lines = [f"Calibration of {model} against published {reference} results (relative accuracy, % of unpatched):",
             "", f"| method | budget (share of tokens) | probe % ± 95% | {reference} % | gap (points) | source |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for row in sorted(rows, key=lambda row: (-row["budget"], row["method"])):
        interval = "" if row["probe_interval"] is None else f" ± {row['probe_interval']:.1f}"
        budget = f"{row['budget']:g} ({100 * row['share']:.3g}%)"
        lines.append(f"| {row['method']} | {budget} | {row['probe']:.1f}{interval} | {row['published']:.1f} | "
                     f"{row['gap']:+.1f} | {row['source']} |")  # fmt: skip
    lines.append("")
    for budget in sorted({row["budget"] for row in rows}, reverse=True):
        at = [row for row in rows if row["budget"] == budget]
        gap = statistics.mean(abs(row["gap"]) for row in at)
        correlation = spearman([row["probe"] for row in at], [row["published"] for row in at])
        rank = "too few methods for a rank correlation" if correlation is None else (
            f"Spearman rho {correlation[0]:+.2f} (exact p = {correlation[1]:.2f})")  # fmt: skip
        lines.append(f"- Budget {budget:g}: {len(at)} methods, mean |gap| {gap:.1f} points; {rank}.")
    cited = dict.fromkeys(row["source"] for row in rows)
    lines += ["", "Sources: " + "; ".join(f"{key}: {SOURCES[key]}" for key in cited) + "."]
    return "\n".join(lines)
