"""`mmtoken report RESULTS.jsonl ...`: markdown tables and Pareto plots from sweep rows.

Per model, one table: each method and budget with its score on every task, the mean over tasks, that mean
relative to the unpatched model (mean over tasks of method / unpatched, in %), both with their 95% intervals where
the scores are accuracies, average visual tokens per layer, language-model prefill FLOPs in % of unpatched by both
formulas, and the median measured prefill time. Two plots per model: mean score against FLOPs % (exact), and
against measured prefill time, with the intervals as error bars. The calibration against published results
(`mmtoken.evaluation.calibration`): LLaVA-1.5-7B's for probe images of a LLaVA-1.5-format model (576 visual
tokens), LLaVA-OneVision-7B's for probe videos.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
from pathlib import Path

from mmtoken.evaluation import calibration, probe_tasks
from mmtoken.zoo import world

UNPATCHED = "none"
SIMPLE_BASELINES = ("random", "uniform", "pooling")
Z95 = 1.96
LLAVA15_TOKENS = 576


def read_rows(paths: list[Path]) -> list[dict]:
    """Rows of every file, the last row of a cell winning. Each row's `table` is its model, or where several files
    hold the model, the model and the file's name: sweeps of other samples and settings never share a table."""
    rows, files_of = {}, {}
    for path in paths:
        for line in Path(path).read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                rows[row["key"]] = {**row, "sweep": Path(path).stem}
                files_of.setdefault(row["model"], set()).add(Path(path).stem)
    for row in rows.values():
        row["table"] = row["model"] if len(files_of[row["model"]]) == 1 else f"{row['model']}, {row['sweep']}"
    return list(rows.values())


def _scores(row: dict) -> dict[str, float]:
    """{task: score} of a row: each leaf task's first metric (a group's own entry is left out)."""
    metrics = row["metrics"]
    leaves = {task: values for task, values in metrics.items() if task != row["task"] or len(metrics) == 1}
    return {task: next(iter(values.values())) for task, values in leaves.items() if values}


def settings(rows: list[dict]) -> dict[str, list[dict]]:
    """Per table (`read_rows`), one entry per (method, budget): the scores of all its cells' tasks and their
    measured costs."""
    grouped: dict[tuple, list[dict]] = {}
    for row in rows:
        grouped.setdefault((row.get("table", row["model"]), row["method"], row["budget"]), []).append(row)
    out: dict[str, list[dict]] = {}
    for (model, method, budget), cells in grouped.items():
        entry = {"method": method, "budget": budget}
        skipped = [cell["skipped"] for cell in cells if "skipped" in cell]
        if skipped:
            entry["skipped"] = skipped[0]
        else:
            entry["scores"] = {task: score for cell in cells for task, score in _scores(cell).items()}
            entry["task_samples"] = {task: cell["samples"] / len(_scores(cell)) for cell in cells
                                     for task in _scores(cell)}  # fmt: skip
            entry["original_visual_tokens"] = cells[0].get("original_visual_tokens")
            weights = [cell["samples"] for cell in cells]
            for key in ("avg_visual_tokens", "flops_ratio_paper", "flops_ratio_exact"):
                entry[key] = sum(cell[key] * weight for cell, weight in zip(cells, weights, strict=True)) / sum(weights)
            entry["prefill_ms"] = statistics.median(cell["prefill_ms"] for cell in cells)
            if all("kv_bytes" in cell for cell in cells):  # rows of sweeps from before KV bytes were recorded lack it
                entry["kv_bytes"] = sum(cell["kv_bytes"] * weight for cell, weight in zip(cells, weights, strict=True))
                entry["kv_bytes"] /= sum(weights)
            entry["device"], entry["batch_size"] = (
                cells[0]["device"],
                json.loads(cells[0]["key"])["model"].get("batch_size", 1),
            )
            entry["samples"] = sum(weights)
        out.setdefault(model, []).append(entry)
    for entries in out.values():
        entries.sort(key=lambda entry: (entry["method"] != UNPATCHED, entry["method"], -(entry["budget"] or 0)))
        _add_relative(entries)
    return out


def _variance(entry: dict, task: str) -> float:
    """The variance of an accuracy of `task` measured on its samples (Agresti-Coull: two successes and two failures
    added, so that 0% and 100% have an interval too)."""
    samples = entry["task_samples"][task]
    adjusted = (entry["scores"][task] * samples + 2) / (samples + 4)
    return adjusted * (1 - adjusted) / (samples + 4)


def task_weights(tasks: list[str]) -> dict[str, float]:
    """The weight of each task in a setting's mean (they sum to 1): probe world v2's tasks as a benchmark suite
    weighs them (each group of `mmtoken.zoo.world.TASK_GROUPS` alike, a group's tasks alike, counting left out as a
    stress task of its own); any other tasks alike."""
    groups = {probe_tasks.task_name(probe_tasks.WORLD + task): group
              for group, members in world.TASK_GROUPS.items() if group != "counting" for task in members}  # fmt: skip
    if not set(tasks) <= {*groups, probe_tasks.task_name(probe_tasks.WORLD + "count")} or not set(tasks) & set(groups):
        return dict.fromkeys(tasks, 1 / len(tasks))
    present = {groups[task] for task in tasks if task in groups}
    return {task: 1 / (len(present) * sum(groups.get(other) == groups[task] for other in tasks))
            for task in tasks if task in groups}  # fmt: skip


def _weighted_mean(values: dict[str, float], weights: dict[str, float]) -> float:
    """The mean of `values` under `weights`; exact where the weights are equal, so that equal sums stay ties."""
    listed = [values[task] for task in weights]
    if len(set(weights.values())) == 1:
        return statistics.mean(listed)
    return statistics.fmean(listed, weights=list(weights.values()))


def _add_relative(entries: list[dict]) -> None:
    baseline = next((entry for entry in entries if entry["method"] == UNPATCHED and "scores" in entry), None)
    accuracies = _fraction_tasks(entries)
    for entry in entries:
        if "scores" not in entry:
            continue
        weights = task_weights(list(entry["scores"]))
        entry["mean"] = _weighted_mean(entry["scores"], weights)
        if set(weights) <= accuracies:
            spread = sum(weight**2 * _variance(entry, task) for task, weight in weights.items())
            entry["mean_interval"] = Z95 * math.sqrt(spread)
        if baseline is not None:
            shared = {task: weight for task, weight in weights.items() if baseline["scores"].get(task)}
            ratios = {task: entry["scores"][task] / baseline["scores"][task] for task in shared}
            entry["relative"] = 100 * _weighted_mean(ratios, shared) if ratios else None
            if ratios and entry is not baseline and set(shared) <= accuracies:
                total, spread = sum(shared.values()), 0.0
                for task, weight in shared.items():
                    unpatched = baseline["scores"][task]
                    variance = _variance(entry, task) / unpatched**2
                    variance += entry["scores"][task] ** 2 * _variance(baseline, task) / unpatched**4
                    spread += (weight / total) ** 2 * variance
                entry["relative_interval"] = 100 * Z95 * math.sqrt(spread)
            if "kv_bytes" in entry and "kv_bytes" in baseline:
                entry["kv_percent"] = 100 * entry["kv_bytes"] / baseline["kv_bytes"]


def _fraction_tasks(entries: list[dict]) -> set[str]:
    """Tasks whose scores all lie in [0, 1]: shown in %."""
    tasks: dict[str, list[float]] = {}
    for entry in entries:
        for task, score in entry.get("scores", {}).items():
            tasks.setdefault(task, []).append(score)
    return {task for task, scores in tasks.items() if all(0 <= score <= 1 for score in scores)}


def markdown_table(model: str, entries: list[dict]) -> str:
    tasks = list(dict.fromkeys(task for entry in entries for task in entry.get("scores", {})))
    percent = _fraction_tasks(entries)

    def shown(task: str, value: float) -> str:
        return f"{100 * value:.1f}" if task in percent else f"{value:.1f}"

    names = [task.removeprefix("mmtoken_probe_") + (" %" if task in percent else "") for task in tasks]
    with_kv = any("kv_percent" in entry for entry in entries)
    header = ["method", "budget", *names, "mean ± 95%", "vs unpatched % ± 95%", "visual tokens",
              "FLOPs % paper / exact", *(["KV %"] if with_kv else []), "prefill ms"]  # fmt: skip
    lines = [f"### {model}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for entry in entries:
        budget = "-" if entry["budget"] is None else str(entry["budget"])
        method = "unpatched" if entry["method"] == UNPATCHED else entry["method"]
        if "skipped" in entry:
            values = [method, budget, "unreachable: " + entry["skipped"]] + [""] * (len(header) - 3)
        else:
            scores = [shown(task, entry["scores"][task]) if task in entry["scores"] else "" for task in tasks]
            mean = shown(tasks[0], entry["mean"]) if all(task in percent for task in tasks) else f"{entry['mean']:.1f}"
            if "mean_interval" in entry:
                mean += f" ± {100 * entry['mean_interval']:.1f}"
            relative = "" if entry.get("relative") is None else f"{entry['relative']:.1f}"
            if relative and "relative_interval" in entry:
                relative += f" ± {entry['relative_interval']:.1f}"
            kv = [f"{entry['kv_percent']:.1f}" if "kv_percent" in entry else "-"] if with_kv else []
            values = [method, budget, *scores, mean, relative, f"{entry['avg_visual_tokens']:.0f}",
                      f"{100 * entry['flops_ratio_paper']:.1f} / {100 * entry['flops_ratio_exact']:.1f}", *kv,
                      f"{entry['prefill_ms']:.0f}"]  # fmt: skip
        lines.append("| " + " | ".join(values) + " |")
    return "\n".join(lines)


def against_baselines(entries: list[dict], scale: float) -> str:
    """A sentence per budget naming the methods whose mean score falls below the best simple baseline's (random,
    uniform grid, pooling) at the same budget."""
    lines = []
    for budget in sorted({entry["budget"] for entry in entries if entry["budget"] is not None}, reverse=True):
        at_budget = [entry for entry in entries if entry["budget"] == budget and "mean" in entry]
        simple = [entry for entry in at_budget if entry["method"] in SIMPLE_BASELINES]
        if not simple:
            continue
        best = max(simple, key=lambda entry: entry["mean"])
        losing = sorted(entry["method"] for entry in at_budget
                        if entry["method"] not in SIMPLE_BASELINES and entry["mean"] < best["mean"])  # fmt: skip
        verdict = f"{', '.join(losing)} score below it" if losing else "every method scores at least as well"
        best_mean = f"{scale * best['mean']:.1f}"
        lines.append(f"- Budget {budget}: the best simple baseline is {best['method']} (mean {best_mean}); {verdict}.")
    return "\n".join(lines)


def _calibration_reference(measured: list[dict]) -> str | None:
    """Which published results a table compares with: LLaVA-1.5-7B's for probe images of its 576 tokens,
    LLaVA-OneVision-7B's for probe videos, none for other tasks or a mix."""
    kinds = {probe_tasks.task_kind(task) for entry in measured for task in entry["scores"]}
    if kinds == {"image"} and {entry.get("original_visual_tokens") for entry in measured} == {LLAVA15_TOKENS}:
        return "image"
    return "video" if kinds == {"video"} else None


def pareto_plot(series: dict[str, list[tuple[float, float, float]]], xlabel: str, ylabel: str, title: str,
                path: Path) -> None:  # fmt: skip
    """One line per method (its budgets, each point (x, y, half-width of y's 95% interval) drawn with its error
    bar), the unpatched model as a star, and the Pareto front (lower x, higher y) of all points as a dashed grey
    step."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axis = pyplot.subplots(figsize=(6.4, 4.2))
    for method, points in series.items():
        x, y, error = zip(*sorted(points), strict=True)
        if method in (UNPATCHED, "unpatched"):
            axis.errorbar(x, y, yerr=error, marker="*", markersize=14, linestyle="", color="black", label="unpatched")
        else:
            axis.errorbar(x, y, yerr=error, marker="o", capsize=2, label=method)
    front, best = [], float("-inf")
    for x, y, _ in sorted(point for points in series.values() for point in points):
        if y > best:
            front.append((x, y))
            best = y
    if len(front) > 1:
        axis.step(
            *zip(*front, strict=True), where="post", linestyle="--", color="grey", alpha=0.6, label="Pareto front"
        )
    axis.set(xlabel=xlabel, ylabel=ylabel, title=title)
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    pyplot.close(figure)


def _slug(model: str) -> str:
    return "".join(char if char.isalnum() or char in "-_" else "-" for char in model.strip("/").split("/")[-1])


def report(paths: list[Path], markdown: Path, figures: Path, command: str) -> str:
    """Write the markdown (linking the plots in `figures`) and the plots; returns the markdown."""
    per_model = settings(read_rows(paths))
    sections = [f"# Sweep results\n\nWritten by `{command}` from {', '.join(f'`{path}`' for path in paths)}.\n"]
    for model, entries in per_model.items():
        measured = [entry for entry in entries if "scores" in entry]
        percent = all(task in _fraction_tasks(entries) for entry in measured for task in entry["scores"])
        scale = 100 if percent else 1
        label = "mean score, %" if percent else "mean score"
        plots = {"flops": ("FLOPs", "flops_ratio_exact", 100, "language-model prefill FLOPs, % of unpatched (exact)"),
                 "prefill": ("prefill time", "prefill_ms", 1, "measured prefill, ms (median)")}  # fmt: skip
        if measured and all("kv_percent" in entry for entry in measured):
            plots["kv"] = ("KV cache", "kv_percent", 1, "KV cache after generation, % of unpatched")
        links = []
        for name, (cost, key, factor, xlabel) in plots.items():
            series: dict[str, list[tuple[float, float, float]]] = {}
            for entry in measured:
                point = (factor * entry[key], scale * entry["mean"], scale * entry.get("mean_interval", 0.0))
                series.setdefault(entry["method"], []).append(point)
            path = figures / f"{_slug(model)}-{name}.png"
            pareto_plot(series, xlabel, label, f"{model}: accuracy against {cost}", path)
            links.append(f"![{model}: accuracy against {cost}]({os.path.relpath(path, markdown.parent)})")
        samples = sorted({entry["samples"] for entry in measured})
        where = sorted({f"batches of {entry['batch_size']} on {entry['device']}" for entry in measured})
        note = (f"Samples per setting: {', '.join(map(str, samples))}. Budget: average visual tokens per "
                "language-model layer. The unpatched row runs under a keep-all patch (the same outputs), so its "
                f"prefill time includes the hooks' cost. Prefill ms: median per batch, {'; '.join(where)}; times "
                "taken on a shared CPU are noisy, GPU speed is `mmtoken bench`'s (BENCHMARKS.md). ± is the 95% "
                "interval of the samples (normal approximation, accuracies adjusted by Agresti-Coull; the relative "
                "one counts the unpatched model's own noise too), and the error bars of the plots.")  # fmt: skip
        tasks = list(dict.fromkeys(task for entry in measured for task in entry["scores"]))
        if set(task_weights(tasks)) != set(tasks) or len(set(task_weights(tasks).values())) > 1:
            note += (" The means weigh probe world v2's task groups alike (perception, attributes, relations, "
                     "reading) and leave counting out, as a stress task in its own column.")  # fmt: skip
        verdicts = against_baselines(entries, scale)
        if verdicts:
            note += "\n\nAgainst the simple baselines (mean over tasks, same budget):\n\n" + verdicts
        reference = _calibration_reference(measured)
        if reference is not None:
            name, published = calibration.REFERENCES[reference]
            compared = calibration.compare(entries, published)
            if compared:
                note += "\n\n" + calibration.markdown(model, compared, name)
        sections.append(markdown_table(model, entries) + "\n\n" + note + "\n\n" + "\n".join(links) + "\n")
    text = "\n".join(sections)
    markdown.parent.mkdir(parents=True, exist_ok=True)
    markdown.write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mmtoken report", description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, nargs="+", help="sweep JSONL files (shards included)")
    parser.add_argument("--markdown", type=Path, help="default: the first results file with .md")
    parser.add_argument("--figures", type=Path, help="folder for the plots; default: beside the markdown")
    args = parser.parse_args(argv)
    markdown = args.markdown or args.results[0].with_suffix(".md")
    figures = args.figures or markdown.parent
    command = "mmtoken report " + " ".join(str(path) for path in args.results)
    if args.markdown:
        command += f" --markdown {args.markdown}"
    if args.figures:
        command += f" --figures {args.figures}"
    print(report(args.results, markdown, figures, command))
