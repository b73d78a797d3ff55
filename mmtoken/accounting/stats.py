"""The numbers a patched call reports: visual tokens per layer, FLOPs ratios, KV bytes, prefill time."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from transformers import PretrainedConfig

from mmtoken.accounting.flops import exact_flops, paper_flops
from mmtoken.engine.state import CallState


@dataclass
class Stats:
    """One call, averaged over batch rows. FLOPs ratios compare the language-model prefill with the same
    prompt unreduced (1.0 = no saving); `kv_bytes` is measured from the cache after the latest step."""

    visual_tokens_per_layer: list[float]
    avg_visual_tokens: float
    original_visual_tokens: float
    flops_ratio_paper: float
    flops_ratio_exact: float
    prefill_seconds: float
    kv_bytes: int

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def measure_stats(call: CallState, depth: int, config: PretrainedConfig, seconds: float, kv_bytes: int) -> Stats:
    """Stats from the token sets of `call` (read on the CPU, so asking costs the GPU nothing)."""
    visual = [call.set_at(layer).visual_counts for layer in range(depth)]
    paper, exact = [], []
    for row, text in enumerate(call.text_counts):
        alive = [text + counts[row] for counts in visual]
        full = [text + call.visual_counts[row]] * depth
        paper.append(paper_flops(alive, config) / paper_flops(full, config))
        exact.append(exact_flops(alive, config) / exact_flops(full, config))
    per_layer = [sum(counts) / len(counts) for counts in visual]
    return Stats(
        visual_tokens_per_layer=per_layer,
        avg_visual_tokens=sum(per_layer) / depth,
        original_visual_tokens=sum(call.visual_counts) / len(call.visual_counts),
        flops_ratio_paper=sum(paper) / len(paper),
        flops_ratio_exact=sum(exact) / len(exact),
        prefill_seconds=seconds,
        kv_bytes=kv_bytes,
    )
