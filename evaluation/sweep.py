"""`mmtoken sweep CONFIG.yaml`: models x methods x budgets x tasks, each cell one lmms-eval evaluation.

Every finished cell appends one JSON line to the results file (flushed and synced), so a sweep stopped by a crash
or Ctrl-C resumes where it stopped: cells already in the file are not run again. `--shard I/N` runs every N-th
cell into its own file beside the results file, for several processes or machines; each shard resumes alone.
Config keys (see benchmarks/sweeps/probe-llava.yaml):

    output: results/sweeps/NAME.jsonl   # where rows go (shards: NAME.shard-I-of-N.jsonl beside it)
    models: [{pretrained: probe-llava, device: cpu, dtype: float32, batch_size: 1}]   # MmtokenModel arguments
    methods: {none: {}, fastv: {}, pdrop: {layers: [2, 8, 16]}}                       # `none`: unpatched
    #   a key that names no method labels the entry whose `method` it gives: {snapkv 25%: {method: snapkv,
    #   ratio: 0.25}}; KV presses keep a share of the cache, not a budget, so `budgets` pass them by
    budgets: [192, 128, 64]             # average visual tokens per layer; `none` runs once, unbudgeted
    tasks: [mmtoken_probe_count, mme]   # lmms-eval tasks or groups; the probe tasks are always included
    limit: 16                           # samples per task (lmms-eval's --limit); omit for all
    include_path: []                    # more lmms-eval task folders
    seed: 0                             # lmms-eval's random seeds
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import yaml
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mmtoken.evaluation.probe_tasks import tasks_path
from mmtoken.methods import METHODS, build
from mmtoken.methods.base import ON_CACHE

_KEYS = {"output", "models", "methods", "budgets", "tasks", "limit", "include_path", "seed"}
_MODEL_KEYS = {"pretrained", "device", "dtype", "attn_implementation", "batch_size", "max_num_frames"}
UNPATCHED = "none"


@dataclass
class Cell:
    """One evaluation: a model's arguments, a method with its parameters and budget, one task (or group)."""

    model: dict
    method: str
    params: dict
    budget: int | None
    task: str
    limit: int | None

    @property
    def key(self) -> str:
        fields = {"model": self.model, "method": self.method, "params": self.params, "budget": self.budget,
                  "task": self.task, "limit": self.limit}  # fmt: skip
        return json.dumps(fields, sort_keys=True)

    @property
    def label(self) -> str:
        budget = "" if self.budget is None else f" @{self.budget}"
        return f"{self.model['pretrained']} {self.method}{budget} {self.task}"


def load_config(path: Path) -> dict:
    """The sweep config, checked: unknown keys, missing keys, bad methods and parameters are refused here."""
    config = yaml.safe_load(Path(path).read_text())
    if not isinstance(config, dict):
        raise ValueError(f"{path}: a sweep config is a mapping with keys {sorted(_KEYS)}")
    unknown = set(config) - _KEYS
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {sorted(unknown)}; known: {sorted(_KEYS)}")
    missing = {"output", "models", "methods", "tasks"} - set(config)
    if missing:
        raise ValueError(f"{path}: missing key(s) {sorted(missing)}")
    for model in config["models"]:
        if "pretrained" not in model or set(model) - _MODEL_KEYS:
            raise ValueError(f"{path}: a model needs `pretrained` and takes only {sorted(_MODEL_KEYS)}, got {model}")
    for label, params in config["methods"].items():
        if label != UNPATCHED:
            name, params = method_of(label, params)
            budgets = _budgets(config, label, name)
            if budgets == [None] and "budget" not in params and not _is_press(name):
                raise ValueError(f"{path}: method {label} has no budget; give `budgets` or a budget of its own")
            for budget in budgets:
                build(name, **_with_budget(params, budget))
    return config


def method_of(label: str, params: dict | None) -> tuple[str, dict]:
    """The method a sweep entry runs and its parameters: the entry's `method` where it gives one, else its key."""
    params = dict(params or {})
    return params.pop("method", label), params


def _is_press(name: str) -> bool:
    return name in METHODS and METHODS[name].stage == ON_CACHE


def _budgets(config: dict, label: str, name: str) -> list[float | None]:
    """The budgets a method entry runs at: the config's, once without for the unpatched model and the KV presses."""
    if label == UNPATCHED or _is_press(name) or not config.get("budgets"):
        return [None]
    return config["budgets"]


def _with_budget(params: dict, budget: int | None) -> dict:
    params = {name: tuple(value) if isinstance(value, list) else value for name, value in params.items()}
    return params if budget is None else {**params, "budget": budget}


def cells(config: dict) -> list[Cell]:
    """Every cell, model by model (so each model loads once), then method, budget and task."""
    out = []
    for model in config["models"]:
        for method, params in config["methods"].items():
            budgets = [None] if method == UNPATCHED else _budgets(config, method, method_of(method, params)[0])
            for budget in budgets:
                for task in config["tasks"]:
                    out.append(Cell(model, method, params or {}, budget, task, config.get("limit")))
    return out


def shard_path(output: Path, shard: tuple[int, int] | None) -> Path:
    if shard is None:
        return output
    return output.with_name(f"{output.stem}.shard-{shard[0]}-of-{shard[1]}{output.suffix}")


def finished(output: Path) -> set[str]:
    """Keys of the cells in the results file and in every shard file beside it."""
    keys = set()
    for path in [output, *sorted(output.parent.glob(f"{output.stem}.shard-*{output.suffix}"))]:
        if path.exists():
            for line in path.read_text().splitlines():
                with contextlib.suppress(json.JSONDecodeError):
                    keys.add(json.loads(line)["key"])
    return keys


def _append(path: Path, row: dict) -> None:
    """One line, whole or not at all: a line cut short by a kill is dropped before the next is written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size and not path.read_bytes().endswith(b"\n"):
        text = path.read_text()
        path.write_text(text[: text.rfind("\n") + 1])
    with path.open("a") as file:
        file.write(json.dumps(row) + "\n")
        file.flush()
        os.fsync(file.fileno())


def sweep(config_path: Path, shard: tuple[int, int] | None = None) -> Path:
    """Run the cells of `config_path` not in its results yet; returns the file rows were written to."""
    config = load_config(config_path)
    from lmms_eval.tasks import TaskManager

    include = [str(tasks_path()), *config.get("include_path", [])]
    manager = TaskManager(verbosity="WARNING", include_path=include, include_defaults=False)
    if any(task not in manager.all_tasks for task in config["tasks"]):  # indexing lmms-eval's own tasks takes ~10 s
        manager = TaskManager(verbosity="WARNING", include_path=include)
    unknown = [task for task in config["tasks"] if task not in manager.all_tasks]
    if unknown:
        raise ValueError(f"{config_path}: unknown lmms-eval task(s) {unknown}")
    output = Path(config["output"])
    path = shard_path(output, shard)
    todo = cells(config)
    if shard is not None:
        todo = todo[shard[0] :: shard[1]]
    done = finished(output)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns) as progress:
        bar = progress.add_task("sweep cells", total=len(todo))
        progress.update(bar, advance=sum(cell.key in done for cell in todo))
        for cell in todo:
            if cell.key in done:
                continue
            progress.update(bar, description=f"sweep: {cell.label}")
            row = run_cell(cell, manager, config.get("seed", 0))
            if int(os.environ.get("RANK", "0")) == 0:  # one writer under `accelerate launch`
                _append(path, row)
                progress.console.print(f"done: {cell.label}")
            progress.update(bar, advance=1)
    return path


def run_cell(cell: Cell, manager: object, seed: int) -> dict | None:
    """One cell through lmms-eval's `simple_evaluate`; the row, or a row saying why the budget is unreachable
    (None on the ranks > 0 of a data-parallel run, which lmms-eval gives no results)."""
    from lmms_eval.evaluator import simple_evaluate

    import mmtoken
    from mmtoken.evaluation.lmms_model import MmtokenModel

    started = time.perf_counter()
    name, params = method_of(cell.method, cell.params)
    params = _with_budget(params, cell.budget)
    row = {"key": cell.key, "model": cell.model["pretrained"], "method": cell.method, "params": cell.params,
           "budget": cell.budget, "task": cell.task, "limit": cell.limit}  # fmt: skip
    try:
        lm = MmtokenModel(**cell.model, method=name, **params)
    except ValueError as unreachable:  # the schedule does not fit the model
        return {**row, "skipped": str(unreachable)}
    row["params"], model = lm.params, lm.model  # with the model's method defaults filled in
    try:
        results = simple_evaluate(
            model=lm, tasks=[cell.task], limit=cell.limit, task_manager=manager, log_samples=True,
            bootstrap_iters=0, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
            fewshot_random_seed=seed, verbosity="WARNING",
        )  # fmt: skip
    except ValueError as unreachable:  # a budget the method cannot reach on these inputs
        return {**row, "skipped": str(unreachable)}
    finally:
        with contextlib.suppress(RuntimeError):  # lmms-eval unpatches through lm.clean() when it finishes
            mmtoken.unpatch(model)
    if results is None:
        return None
    samples = [sample for task_samples in results["samples"].values() for sample in task_samples]
    stats = [sample["token_counts"][0]["mmtoken"] for sample in samples]
    return {
        **row,
        "metrics": {task: _metrics(values) for task, values in results["results"].items()},
        "samples": len(samples),
        "avg_visual_tokens": statistics.mean(stat["avg_visual_tokens"] for stat in stats),
        "original_visual_tokens": statistics.mean(stat["original_visual_tokens"] for stat in stats),
        "visual_tokens_per_layer": [statistics.mean(layer) for layer in
                                    zip(*(stat["visual_tokens_per_layer"] for stat in stats), strict=True)],
        "flops_ratio_paper": statistics.mean(stat["flops_ratio_paper"] for stat in stats),
        "flops_ratio_exact": statistics.mean(stat["flops_ratio_exact"] for stat in stats),
        "prefill_ms": statistics.median(stat["prefill_ms"] for stat in stats),
        "kv_bytes": statistics.mean(stat["kv_bytes"] for stat in stats),
        "device": str(model.device),
        "seconds": time.perf_counter() - started,
        "lmms_eval": version("lmms_eval"),
    }  # fmt: skip


def _metrics(values: dict) -> dict:
    """lmms-eval's `metric,filter` entries of one task as {metric: value}, numbers only, no standard errors."""
    out = {}
    for name, value in values.items():
        metric = name.split(",")[0]
        if isinstance(value, (int, float)) and "," in name and "_stderr" not in metric:
            out[metric] = value
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mmtoken sweep", description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--shard", help="I/N: run every N-th cell starting at I (0-based), into its own file")
    args = parser.parse_args(argv)
    from loguru import logger  # lmms-eval's logger: keep its per-cell chatter out of the progress bar

    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    shard = None
    if args.shard:
        index, count = (int(part) for part in args.shard.split("/"))
        if not 0 <= index < count:
            raise SystemExit(f"--shard I/N needs 0 <= I < N, got {args.shard}")
        shard = (index, count)
    print(f"rows: {sweep(args.config, shard)}")
