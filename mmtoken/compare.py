"""`mmtoken compare`: the unpatched model next to each method at the papers' budgets, on one set of prompts."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import track
from rich.table import Table

import mmtoken
from mmtoken.zoo.tiny import tiny_inputs, tiny_model

PAPER_BUDGETS = (192, 128, 64)
PAPER_VISUAL_TOKENS = 576
METHODS = {
    "fastv": {"k": 1},
    "pdrop": {"layers": (1, 2, 4)},
    "random": {},
    "uniform": {},
    "pooling": {},
}


def _answers(model, batch, new_tokens: int) -> tuple[torch.Tensor, float]:
    started = time.perf_counter()
    out = model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return out[:, batch["input_ids"].shape[1] :], time.perf_counter() - started


def compare(prompts: int = 8, new_tokens: int = 4, out: Path = Path("results")) -> list[dict]:
    """Run every method at the budgets 192 / 128 / 64 (scaled to this model's visual tokens) and tabulate."""
    model, processor = tiny_model("llava")
    batch = tiny_inputs(processor, "llava", batch=prompts)
    with torch.no_grad():
        expected, _ = _answers(model, batch, new_tokens)
    visual = int((batch["input_ids"][0] == model.config.image_token_id).sum())
    rows = [
        {
            "method": "unpatched",
            "budget": "-",
            "avg_visual_tokens": float(visual),
            "flops_paper": 100.0,
            "flops_exact": 100.0,
            "prefill_ms": None,
            "agreement": 100.0,
        }
    ]
    cells = [(name, budget) for name in METHODS for budget in PAPER_BUDGETS]
    for name, budget in track(cells, description="methods x budgets"):
        scaled = budget * visual / PAPER_VISUAL_TOKENS
        params = {**METHODS[name], "budget": scaled}
        prefill = []
        with mmtoken.patched(model, name, **params) as handle, torch.no_grad():
            try:
                for _ in range(3):
                    answers, _ = _answers(model, batch, new_tokens)
                    prefill.append(handle.stats.prefill_seconds)
            except ValueError as unreachable:
                rows.append({"method": name, "budget": f"{budget} ({scaled:.1f})", "skipped": str(unreachable)})
                continue
            stats = handle.stats
        rows.append(
            {
                "method": name,
                "budget": f"{budget} ({scaled:.1f})",
                "avg_visual_tokens": stats.avg_visual_tokens,
                "flops_paper": 100 * stats.flops_ratio_paper,
                "flops_exact": 100 * stats.flops_ratio_exact,
                "prefill_ms": 1000 * statistics.median(prefill),
                "agreement": 100 * float((answers == expected).float().mean()),
            }
        )
    _report(rows, visual, out)
    return rows


def _report(rows: list[dict], visual: int, out: Path) -> None:
    columns = [
        "method",
        "budget",
        "avg visual tokens",
        "FLOPs % paper",
        "FLOPs % exact",
        "prefill ms (CPU)",
        "tokens equal to unpatched %",
    ]
    table = Table(*columns, title="mmtoken compare")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        if "skipped" in row:
            values = [row["method"], row["budget"], row["skipped"], "", "", "", ""]
            table.add_row(*values)
            lines.append("| " + " | ".join(values) + " |")
            continue
        prefill = "-" if row["prefill_ms"] is None else f"{row['prefill_ms']:.1f}"
        values = [
            row["method"],
            row["budget"],
            f"{row['avg_visual_tokens']:.1f}",
            f"{row['flops_paper']:.1f}",
            f"{row['flops_exact']:.1f}",
            prefill,
            f"{row['agreement']:.0f}",
        ]
        table.add_row(*values)
        lines.append("| " + " | ".join(values) + " |")
    note = (
        f"Model: a tiny random-weight LLaVA-1.5-format model ({visual} visual tokens per image), NOT a trained "
        "model: agreement with the unpatched answers shows the pipeline works, not quality. Budgets are the "
        f"papers' 192 / 128 / 64 of {PAPER_VISUAL_TOKENS}, scaled to this model's visual tokens."
    )
    console = Console()
    console.print(table)
    console.print(note)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(f"# mmtoken compare\n\n{note}\n\nCommand: `./run.sh`\n\n" + "\n".join(lines) + "\n")
    console.print(f"written: {out / 'compare.md'}")
