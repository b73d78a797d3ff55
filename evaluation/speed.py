"""GPU speed of patched against unpatched prefill, at real model sizes with random weights.

Times are CUDA-event medians after warm-up. The vision encoder runs once per shape; prefill then runs on its
features (`mm_encoder_outputs`), so prefill times are the language model's own. Every row is a ratio against
the unpatched model measured in the same run, next to the ceiling the FLOPs cut would allow.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from rich.progress import track
from transformers import AutoModelForImageTextToText, DynamicCache, LlavaConfig

import mmtoken

LLAVA_15_7B = LlavaConfig(
    vision_config={
        "model_type": "clip_vision_model",
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "image_size": 336,
        "patch_size": 14,
        "projection_dim": 768,
    },
    text_config={
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32064,
        "max_position_embeddings": 4096,
    },
    image_token_index=32000,
    vision_feature_layer=-2,
    vision_feature_select_strategy="default",
)
TEXT_BEFORE, TEXT_AFTER = 35, 25


@dataclass
class Setting:
    """One patched configuration: a label, a method name and its parameters (None: the unpatched model)."""

    label: str
    method: str | None = None
    params: dict | None = None


def settings(budgets: list[int]) -> list[Setting]:
    rows = [Setting("unpatched"), Setting("fastv keep-all (hook cost)", "fastv", {"k": 2, "ratio": 1.0})]
    for budget in budgets:
        rows.append(Setting(f"fastv K=2 @{budget}", "fastv", {"k": 2, "budget": budget}))
        rows.append(Setting(f"pdrop 2/8/16 @{budget}", "pdrop", {"layers": (2, 8, 16), "budget": budget}))
    return rows


def build_model(attention: str) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForImageTextToText.from_config(
            LLAVA_15_7B, dtype=torch.bfloat16, attn_implementation=attention
        )
    return model.eval()


def prompt(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    image_tokens = (LLAVA_15_7B.vision_config.image_size // LLAVA_15_7B.vision_config.patch_size) ** 2
    generator = torch.Generator().manual_seed(0)
    text = torch.randint(3, 32000, (batch, TEXT_BEFORE + TEXT_AFTER), generator=generator)
    image = torch.full((batch, image_tokens), LLAVA_15_7B.image_token_index)
    input_ids = torch.cat([text[:, :TEXT_BEFORE], image, text[:, TEXT_BEFORE:]], dim=1).cuda()
    return input_ids, torch.ones_like(input_ids)


def cuda_ms(run, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _prefill(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, features: dict) -> None:
    model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        mm_encoder_outputs=features,
        past_key_values=DynamicCache(config=model.config),
        use_cache=True,
        logits_to_keep=1,
    )


def _time_once(model, setting: Setting, prefill) -> tuple[float, object]:
    """One timed prefill under `setting`; returns milliseconds and the handle's stats (None unpatched)."""
    if setting.method is None:
        return cuda_ms(prefill, repeats=1, warmup=0), None
    with mmtoken.patched(model, setting.method, **setting.params) as handle:
        return cuda_ms(prefill, repeats=1, warmup=0), handle.stats


@torch.no_grad()
def measure(batches: list[int], budgets: list[int], attention: str, repeats: int, warmup: int = 3) -> list[dict]:
    """Settings are timed in turn, round after round, so drift of clocks or load hits them all alike."""
    model = build_model(attention)
    rows = []
    for batch in batches:
        input_ids, attention_mask = prompt(batch)
        pixels = torch.randn(batch, 3, 336, 336, device="cuda", dtype=torch.bfloat16)
        encode = partial(model.model.get_image_features, pixel_values=pixels)
        vision_ms = cuda_ms(encode, repeats)
        prefill = partial(_prefill, model, input_ids, attention_mask, {"image": encode()})
        grid = settings(budgets)
        times: dict[str, list[float]] = {setting.label: [] for setting in grid}
        stats: dict[str, object] = {}
        for round_index in track(range(warmup + repeats), description=f"batch {batch}"):
            for setting in grid:
                milliseconds, stats[setting.label] = _time_once(model, setting, prefill)
                if round_index >= warmup:
                    times[setting.label].append(milliseconds)
        baseline_ms = statistics.median(times[grid[0].label])
        for setting in grid:
            prefill_ms, measured = statistics.median(times[setting.label]), stats[setting.label]
            flops_exact = 1.0 if measured is None else measured.flops_ratio_exact
            rows.append(
                {
                    "batch": batch,
                    "setting": setting.label,
                    "avg_visual_tokens": 576.0 if measured is None else measured.avg_visual_tokens,
                    "vision_ms": vision_ms,
                    "prefill_ms": prefill_ms,
                    "speedup": baseline_ms / prefill_ms,
                    "flops_ratio_paper": 1.0 if measured is None else measured.flops_ratio_paper,
                    "flops_ratio_exact": flops_exact,
                    "flops_ceiling": 1 / flops_exact,
                    "ttft_speedup": (vision_ms + baseline_ms) / (vision_ms + prefill_ms),
                }
            )
    return rows


def _realised(row: dict) -> str:
    """The share of the speedup the FLOPs cut allows that the clock shows."""
    if row["flops_ceiling"] < 1.01:
        return "-"
    return f"{100 * (row['speedup'] - 1) / (row['flops_ceiling'] - 1):.0f}%"


def markdown(rows: list[dict]) -> str:
    header = (
        "| batch | setting | avg visual tokens | prefill ms | speedup | FLOPs % (paper / exact) | "
        "FLOPs ceiling | realised | TTFT speedup (with vision ms) |"
    )
    lines = [header, "|" + "---|" * 9]
    for row in rows:
        lines.append(
            f"| {row['batch']} | {row['setting']} | {row['avg_visual_tokens']:.0f} | {row['prefill_ms']:.1f} | "
            f"{row['speedup']:.2f}x | {100 * row['flops_ratio_paper']:.1f} / {100 * row['flops_ratio_exact']:.1f} | "
            f"{row['flops_ceiling']:.2f}x | {_realised(row)} | "
            f"{row['ttft_speedup']:.2f}x ({row['vision_ms']:.1f}) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mmtoken bench", description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--budgets", type=int, nargs="+", default=[192, 128, 64])
    parser.add_argument("--attention", default="sdpa")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("results/speed"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("mmtoken bench measures GPU speed and needs a CUDA device")
    rows = measure(args.batch, args.budgets, args.attention, args.repeats)
    args.out.mkdir(parents=True, exist_ok=True)
    environment = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "attention": args.attention,
    }
    (args.out / "speed.json").write_text(json.dumps({"environment": environment, "rows": rows}, indent=1))
    table = markdown(rows)
    (args.out / "speed.md").write_text(table + "\n")
    print(environment)
    print(table)
