"""The numbers a patched call reports: visual tokens per layer, FLOPs ratios, KV bytes, prefill time."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from transformers import PretrainedConfig

from mmtoken.accounting.flops import exact_flops, paper_flops
from mmtoken.state import CallState


@dataclass
class RowStats:
    """One batch row of a call: its visual tokens alive at each decoder layer and its FLOPs ratios."""

    visual_tokens_per_layer: list[int]
    avg_visual_tokens: float
    original_visual_tokens: int
    flops_ratio_paper: float
    flops_ratio_exact: float


@dataclass
class Stats:
    """One call, averaged over batch rows (each row alone in `rows`). FLOPs ratios compare the language-model
    prefill with the same prompt unreduced (1.0 = no saving); `kv_bytes` is measured from the cache after the
    latest step; `prefill_seconds` where the patch times prefills (`mmtoken.patch(..., timing=True)`), else None."""

    visual_tokens_per_layer: list[float]
    avg_visual_tokens: float
    original_visual_tokens: float
    flops_ratio_paper: float
    flops_ratio_exact: float
    prefill_seconds: float | None
    kv_bytes: int
    rows: list[RowStats]

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def cache_bytes(cache: object) -> int:
    """Bytes of the keys and values a transformers cache holds, summed over its layers."""
    return sum(
        layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
        for layer in cache.layers
        if getattr(layer, "keys", None) is not None
    )


def measure_stats(call: CallState, depth: int, config: PretrainedConfig, seconds: float | None, kv_bytes: int) -> Stats:
    """Stats from the token sets of `call` (read on the CPU, so asking costs the GPU nothing)."""
    visual = [call.set_at(layer).visual_counts for layer in range(depth)]
    rows = []
    for row, text in enumerate(call.text_counts):
        per_layer = [counts[row] for counts in visual]
        alive = [text + count for count in per_layer]
        full = [text + call.visual_counts[row]] * depth
        rows.append(
            RowStats(
                visual_tokens_per_layer=per_layer,
                avg_visual_tokens=sum(per_layer) / depth,
                original_visual_tokens=call.visual_counts[row],
                flops_ratio_paper=paper_flops(alive, config) / paper_flops(full, config),
                flops_ratio_exact=exact_flops(alive, config) / exact_flops(full, config),
            )
        )
    per_layer = [sum(counts) / len(counts) for counts in visual]
    return Stats(
        visual_tokens_per_layer=per_layer,
        avg_visual_tokens=sum(per_layer) / depth,
        original_visual_tokens=sum(call.visual_counts) / len(call.visual_counts),
        flops_ratio_paper=sum(row.flops_ratio_paper for row in rows) / len(rows),
        flops_ratio_exact=sum(row.flops_ratio_exact for row in rows) / len(rows),
        prefill_seconds=seconds,
        kv_bytes=kv_bytes,
        rows=rows,
    )
