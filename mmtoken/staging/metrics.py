"""What a load run measured: per request TTFT, TPOT, end-to-end and queueing time; per run the share of requests
within the SLO and the goodput (requests per second that met it), and how much the decode steps of running
requests slow down while heavy requests (videos) are encoded and prefilled."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SLO:
    """Service-level objective of one request: first token within `ttft_s`, then `tpot_s` per token or less."""

    ttft_s: float
    tpot_s: float

    def met(self, record: dict) -> bool:
        return (record.get("error") is None and record.get("ttft_s") is not None
                and record["ttft_s"] <= self.ttft_s and record["tpot_s"] <= self.tpot_s)  # fmt: skip


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None}
    p50, p90, p99 = np.percentile(values, [50, 90, 99]).tolist()
    return {"p50": p50, "p90": p90, "p99": p99}


def summarize(records: list[dict], slo: SLO) -> dict:
    """Counts, SLO attainment (of every request sent, refused ones included), goodput and throughput over the run's
    span (first arrival to last token), and percentiles of each time."""
    answered = [record for record in records if record.get("error") is None and record.get("ttft_s") is not None]
    ends = [record["at"] + record["e2e_s"] for record in answered]
    span = max(ends) - min(record["at"] for record in records) if ends else None
    met = sum(slo.met(record) for record in records)
    summary = {
        "requests": len(records),
        "answered": len(answered),
        "refused": sum(record.get("error") == "refused" for record in records),
        "failed": sum(record.get("error") not in (None, "refused") for record in records),
        "slo_attainment": met / len(records) if records else None,
        "goodput_rps": met / span if span else None,
        "throughput_rps": len(answered) / span if span else None,
        "span_s": span,
    }
    for key in ("ttft_s", "tpot_s", "e2e_s", "queue_s"):
        values = [record[key] for record in answered if record.get(key) is not None]
        summary.update({f"{key[:-2]}_{name}_s": value for name, value in _percentiles(values).items()})
    return summary | interference(answered)


def interference(records: list[dict], heavy: tuple[str, ...] = ("video",)) -> dict[str, float | None]:
    """The p99 time between two tokens of a running request, for the gaps that overlap the encode and prefill of a
    `heavy` request (from its batch's start to its first token) and for the others, and their ratio (the rise the
    heavy requests cause: EPD's goal keeps it within 1.2). Needs each record's `token_offsets_s`."""
    busy = [
        (record["at"] + record["queue_s"], record["at"] + record["ttft_s"])
        for record in records
        if record.get("kind") in heavy and record.get("ttft_s") is not None and record.get("queue_s") is not None
    ]
    during, quiet = [], []
    for record in records:
        offsets = record.get("token_offsets_s") or []
        for first, second in itertools.pairwise(offsets):
            start, end = record["at"] + first, record["at"] + second
            overlaps = any(begin < end and start < finish for begin, finish in busy)
            (during if overlaps else quiet).append(second - first)
    p99_during = _percentiles(during)["p99"]
    p99_quiet = _percentiles(quiet)["p99"]
    rise = p99_during / p99_quiet if p99_during is not None and p99_quiet else None
    return {
        "step_p99_quiet_s": p99_quiet,
        "step_p99_during_heavy_s": p99_during,
        "step_rise": rise,
        "steps_during_heavy": len(during),
        "steps_quiet": len(quiet),
    }
