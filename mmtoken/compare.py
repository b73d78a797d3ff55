"""`mmtoken compare`: the unpatched probe model next to each method at the papers' budgets, on one probe set."""

from __future__ import annotations

import statistics
from pathlib import Path

import torch
import transformers
from rich.console import Console
from rich.progress import track
from rich.table import Table

import mmtoken
from mmtoken.evaluation.report import pareto_plot
from mmtoken.zoo.embedded import ACCURACY_FLOOR, RELIABLE_TASKS, accuracy, ask, load, method_parameters, probe_samples
from mmtoken.zoo.probe import Sample

BUDGETS = (192, 128, 64)
METHODS = ("fastv", "pdrop", "random", "uniform", "pooling")
MODEL = "probe-llava"
# an unpatched score this many points under the model card's floor is no measurement but a broken environment
FAR_BELOW_FLOOR = 20


class BrokenMeasurement(RuntimeError):
    """The unpatched model scores far below its model card: the table would be garbage, so none is written."""


def _run(model, processor, samples: list[Sample], handle=None) -> dict:
    answers, prefill, visual, flops_paper, flops_exact = [], [], [], [], []
    for sample in samples:
        answers.append(ask(model, processor, sample))
        if handle is not None:
            stats = handle.stats
            prefill.append(stats.prefill_seconds)
            visual.append(stats.avg_visual_tokens)
            flops_paper.append(stats.flops_ratio_paper)
            flops_exact.append(stats.flops_ratio_exact)
    row = accuracy(samples, answers)
    if handle is not None:
        row["visual"] = statistics.mean(visual)
        row["flops_paper"] = 100 * statistics.mean(flops_paper)
        row["flops_exact"] = 100 * statistics.mean(flops_exact)
        row["prefill_ms"] = 1000 * statistics.median(prefill)
    return row


def compare(per_task: int = 16, seed: int = 7, out: Path = Path("results")) -> list[dict]:
    """Run every method at 192 / 128 / 64 visual tokens on `per_task` fresh probe samples of each reliable task."""
    torch.manual_seed(0)
    model, processor = load(MODEL)
    tasks = RELIABLE_TASKS[MODEL]
    samples = probe_samples(MODEL, per_task, seed)
    with mmtoken.patched(model, "random", ratio=1.0, timing=True) as handle:
        rows = [{"method": "unpatched", "budget": 576, **_run(model, processor, samples, handle)}]
    check_unpatched(rows[0], MODEL)
    cells = [(name, budget) for name in METHODS for budget in BUDGETS]
    depth, visual = model.config.text_config.num_hidden_layers, model.config.image_seq_length
    for name, budget in track(cells, description="methods x budgets"):
        parameters = method_parameters(MODEL, name, budget, depth, visual)
        with mmtoken.patched(model, name, budget=budget, timing=True, **parameters) as handle:
            try:
                rows.append({"method": name, "budget": budget, **_run(model, processor, samples, handle)})
            except ValueError as unreachable:
                rows.append({"method": name, "budget": budget, "skipped": str(unreachable)})
    _report(rows, tasks, per_task, out)
    return rows


def check_unpatched(row: dict[str, float], model_name: str) -> None:
    """Raise `BrokenMeasurement` when the unpatched model answers a reliable task far below its model card's floor."""
    floor = ACCURACY_FLOOR["image"]
    failing = {task: row[task] for task in RELIABLE_TASKS[model_name] if row[task] < floor - FAR_BELOW_FLOOR}
    if failing:
        scores = ", ".join(f"{task} {score:.0f}%" for task, score in failing.items())
        raise BrokenMeasurement(
            f"unpatched {model_name} answered {scores} of fresh probe questions, far below its model card's "
            f"{floor}% floor, so no table was written. Likely cause: a transformers release mmtoken was not tested "
            f"with (installed: {transformers.__version__}; README, 'Tested versions'). Reinstall the tested "
            "releases with `rm -rf .venv && ./run.sh`."
        )


def _report(rows: list[dict], tasks: tuple[str, ...], per_task: int, out: Path) -> None:
    columns = ["method", "budget", *tasks, "average", "visual tokens", "FLOPs % paper / exact", "prefill ms (CPU)"]
    table = Table(*columns, title=f"mmtoken compare: {MODEL}, accuracy % on {per_task} fresh samples per task")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        if "skipped" in row:
            values = [row["method"], str(row["budget"]), "unreachable: " + row["skipped"].split(": ")[-1]]
            values += [""] * (len(columns) - len(values))
        else:
            values = [row["method"], str(row["budget"]), *(f"{row[task]:.0f}" for task in tasks),
                      f"{row['average']:.1f}", f"{row['visual']:.0f}",
                      f"{row['flops_paper']:.0f} / {row['flops_exact']:.0f}", f"{row['prefill_ms']:.0f}"]  # fmt: skip
        table.add_row(*values)
        lines.append("| " + " | ".join(values) + " |")
    console = Console()
    console.print(table)
    out.mkdir(parents=True, exist_ok=True)
    note = (f"Model `{MODEL}` (trained, LLaVA-1.5 format, 576 visual tokens, 6 decoder layers); tasks where it "
            f"reaches its accuracy floor: {', '.join(tasks)}. Budgets are average visual tokens per layer. "
            "The unpatched row is measured through a keep-all patch (the same tokens, tested), so its prefill "
            "time includes the hooks' own cost. Command: `./run.sh`.")  # fmt: skip
    (out / "compare.md").write_text(f"# mmtoken compare\n\n{note}\n\n" + "\n".join(lines) + "\n")
    _plot([row for row in rows if "skipped" not in row], out / "compare.png")
    console.print(note)
    console.print(f"written: {out / 'compare.md'}, {out / 'compare.png'}")


def _plot(rows: list[dict], path: Path) -> None:
    series: dict[str, list[tuple[float, float, float]]] = {}
    for row in rows:  # the table gives no interval, so the points have no error bars
        series.setdefault(row["method"], []).append((row["flops_exact"], row["average"], 0.0))
    pareto_plot(series, "language-model prefill FLOPs, % of unpatched (exact)", "probe accuracy, %",
                f"{MODEL}: accuracy against cost", path)  # fmt: skip
