"""The numbers a patched call reports: visual tokens per layer, FLOPs ratios, KV bytes, prefill time."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from mmtoken.accounting.flops import exact_flops, paper_flops
from mmtoken.engine.state import TEXT, CallState


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
    kv_bytes: int = 0

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def measure_stats(call: CallState, depth: int, adapter, seconds: float) -> Stats:
    config = adapter.language_model.config
    visual = [call.visual(call.set_at(layer)).sum(1) for layer in range(depth)]
    text = [
        ((call.kinds.gather(1, call.set_at(layer).position) == TEXT) & call.set_at(layer).valid).sum(1)
        for layer in range(depth)
    ]
    prompt = (~call.padding).sum(1)
    paper, exact = [], []
    for row in range(call.batch_size):
        alive = [int(visual[layer][row] + text[layer][row]) for layer in range(depth)]
        full = [int(prompt[row])] * depth
        paper.append(paper_flops(alive, config) / paper_flops(full, config))
        exact.append(exact_flops(alive, config) / exact_flops(full, config))
    per_layer = [float(count.float().mean()) for count in visual]
    return Stats(
        visual_tokens_per_layer=per_layer,
        avg_visual_tokens=sum(per_layer) / depth,
        original_visual_tokens=float(call.original_visual_counts().float().mean()),
        flops_ratio_paper=sum(paper) / len(paper),
        flops_ratio_exact=sum(exact) / len(exact),
        prefill_seconds=seconds,
    )
