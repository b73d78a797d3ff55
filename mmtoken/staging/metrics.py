"""What a load run measured: per request TTFT, TPOT, end-to-end and queueing time; per run the share of requests
within the SLO and the goodput (requests per second that met it)."""

from __future__ import annotations

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
    return summary
