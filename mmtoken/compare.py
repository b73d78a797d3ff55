"""`mmtoken compare`: the unpatched probe model next to each method at the papers' budgets, on one probe set."""

from __future__ import annotations

import statistics
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import track
from rich.table import Table

import mmtoken
from mmtoken.zoo import probe
from mmtoken.zoo.embedded import RELIABLE_TASKS, ask, load

BUDGETS = (192, 128, 64)
METHODS = {
    "fastv": {"k": 1},
    "pdrop": {"layers": (1, 2, 4)},
    "random": {},
    "uniform": {},
    "pooling": {},
}
MODEL = "probe-llava"


def probe_samples(model_name: str, per_task: int, seed: int) -> list[probe.Sample]:
    """`per_task` fresh image samples of each task the model answers reliably, drawn from `seed`."""
    tasks = RELIABLE_TASKS[model_name]
    return [sample for task in tasks for sample in probe.generate("image", n=per_task, seed=seed, task=task)]


def accuracy(samples: list[probe.Sample], answers: list[str]) -> dict[str, float]:
    """Accuracy % on each task and the average over tasks."""
    hits: dict[str, list[bool]] = {}
    for sample, answer in zip(samples, answers, strict=True):
        hits.setdefault(sample.task, []).append(answer == sample.answer)
    row = {task: 100 * sum(results) / len(results) for task, results in hits.items()}
    row["average"] = sum(row.values()) / len(row)
    return row


def _run(model, processor, samples: list[probe.Sample], handle=None) -> dict:
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
    with mmtoken.patched(model, "random", ratio=1.0) as handle:
        rows = [{"method": "unpatched", "budget": 576, **_run(model, processor, samples, handle)}]
    cells = [(name, budget) for name in METHODS for budget in BUDGETS]
    for name, budget in track(cells, description="methods x budgets"):
        with mmtoken.patched(model, name, budget=budget, **METHODS[name]) as handle:
            try:
                rows.append({"method": name, "budget": budget, **_run(model, processor, samples, handle)})
            except ValueError as unreachable:
                rows.append({"method": name, "budget": budget, "skipped": str(unreachable)})
    _report(rows, tasks, per_task, out)
    return rows


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
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axis = pyplot.subplots(figsize=(6, 4))
    for method in dict.fromkeys(row["method"] for row in rows):
        points = sorted((row["flops_exact"], row["average"]) for row in rows if row["method"] == method)
        axis.plot(*zip(*points, strict=True), marker="o", label=method)
    axis.set(xlabel="language-model prefill FLOPs, % of unpatched (exact)", ylabel="probe accuracy, %",
             title=f"{MODEL}: accuracy against cost")  # fmt: skip
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
