"""`mmtoken search`: per-layer schedules searched on a probe model's calibration set and written as YAML that
`mmtoken.patch` loads. G-Search and P-Sigmoid follow "Accelerating Multimodal LLMs by Searching Optimal Vision
Token Reduction" (arXiv 2412.00556)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from functools import cached_property
from pathlib import Path

import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from transformers import PreTrainedModel, ProcessorMixin

import mmtoken
from mmtoken.encoding import Encoded
from mmtoken.methods import GSearch, Method, PSigmoid
from mmtoken.zoo import probe
from mmtoken.zoo.embedded import accuracy, answers, encode, load, probe_samples


@dataclass
class Calibration:
    """Fresh samples of a probe model's reliable tasks, through the vision tower once, to answer under many
    methods. `evaluate` gives the accuracy % (average over tasks) and the average visual tokens per layer."""

    model: PreTrainedModel
    processor: ProcessorMixin
    samples: list[probe.Sample]

    @classmethod
    def of(cls, name: str = "probe-llava", per_task: int = 16, seed: int = 0) -> Calibration:
        model, processor = load(name)
        return cls(model, processor, probe_samples(name, per_task, seed))

    @cached_property
    def encoded(self) -> tuple[dict, Encoded]:
        """The samples' prompts and their media through the vision tower, once."""
        return encode(self.model, self.processor, self.samples)

    @property
    def depth(self) -> int:
        return len(self.model.get_decoder().layers)

    @property
    def visual(self) -> int:
        """Visual tokens of one sample (all probe images have the same)."""
        return int((self.encoded[0]["input_ids"][0] == self.model.config.image_token_id).sum())

    def evaluate(self, method: Method | None) -> tuple[float, float]:
        """Calibration accuracy and average visual tokens of `method` (None: the unpatched model)."""
        inputs, encoded = self.encoded
        if method is None:
            given = answers(self.model, self.processor, inputs, encoded=encoded)
            return accuracy(self.samples, given)["average"], self.visual
        with mmtoken.patched(self.model, method) as handle:
            given = answers(self.model, self.processor, inputs, encoded=encoded)
            return accuracy(self.samples, given)["average"], handle.stats.avg_visual_tokens


@contextmanager
def _progress(description: str, total: int) -> Iterator[tuple[Progress, object]]:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console()) as progress:
        yield progress, progress.add_task(description, total=total)


@dataclass
class Found:
    """A searched schedule, with the calibration accuracy it reached next to the unpatched model's."""

    method: Method
    accuracy: float
    unpatched: float
    visual: float


def g_search(calibration: Calibration, tolerance: float = 1.0, steps: int = 8) -> Found:
    """G-Search: shallow to deep, the fewest visual tokens each layer can keep (every deeper layer keeping the
    same) with calibration accuracy no more than `tolerance` points below the unpatched model's. Counts come from
    a grid of `steps` + 1 equal fractions of the visual tokens and are bisected, assuming accuracy grows with
    the count; a layer never keeps more than the one before it."""
    if tolerance < 0 or steps < 1:
        raise ValueError(f"g_search: tolerance must be >= 0 and steps >= 1, got {tolerance} and {steps}")
    depth, visual = calibration.depth, calibration.visual
    grid = sorted({round(visual * step / steps) for step in range(steps + 1)})
    trials = (depth - 1) * math.ceil(math.log2(len(grid)))
    seen: dict[tuple[int, ...], tuple[float, float]] = {}
    with _progress("G-Search", trials) as (progress, task):
        unpatched, _ = calibration.evaluate(None)
        progress.console.print(f"unpatched: accuracy {unpatched:.1f}%, target >= {unpatched - tolerance:.1f}%")
        keep = [visual] * depth

        def holds(layer: int, count: int) -> bool:
            schedule = tuple(keep[:layer] + [count] * (depth - layer))
            if schedule not in seen:
                seen[schedule] = calibration.evaluate(GSearch(keep=schedule, visual=visual))
                progress.advance(task)
                score, average = seen[schedule]
                progress.console.print(f"layer {layer} keeps {count:4d}: accuracy {score:5.1f}%, "
                                       f"{average:6.1f} visual tokens per layer  {schedule}")  # fmt: skip
            return seen[schedule][0] >= unpatched - tolerance

        for layer in range(1, depth):
            candidates = [count for count in grid if count <= keep[layer - 1]]
            low, high = 0, len(candidates) - 1  # the count the layer before keeps is known to hold
            while low < high:
                middle = (low + high) // 2
                low, high = (low, middle) if holds(layer, candidates[middle]) else (middle + 1, high)
            keep[layer:] = [candidates[high]] * (depth - layer)
        progress.update(task, total=len(seen), completed=len(seen))
    found = GSearch(keep=tuple(keep), visual=visual)
    score, average = seen.get(tuple(keep), (unpatched, float(visual)))
    return Found(found, score, unpatched, average)


def _optuna():
    try:
        import optuna
    except ImportError as missing:
        raise ImportError('P-Sigmoid search needs optuna: pip install "mmtoken[search]"') from missing
    return optuna


def p_sigmoid_search(calibration: Calibration, budget: float, trials: int = 30, seed: int = 0) -> Found:
    """P-Sigmoid: Bayesian optimisation (optuna's tree-structured Parzen estimator) of the sigmoid's slope and
    floor for the best calibration accuracy, each trial's center solved so that it averages `budget` visual
    tokens per layer (the FLOPs budget)."""
    depth, visual = calibration.depth, calibration.visual
    highest_floor = (depth * budget / visual - 1) / (depth - 1)
    if highest_floor < 0 or budget > visual:
        lowest = visual / depth
        raise ValueError(f"psigmoid: budget {budget} is out of reach: between {lowest:.1f} and {visual} on this model")
    if trials < 1:
        raise ValueError(f"psigmoid: trials must be >= 1, got {trials}")
    optuna = _optuna()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    with _progress("P-Sigmoid", trials) as (progress, task):
        unpatched, _ = calibration.evaluate(None)
        progress.console.print(f"unpatched: accuracy {unpatched:.1f}%; budget {budget} visual tokens per layer")

        def objective(trial) -> float:
            slope = trial.suggest_float("slope", 1.0, 60.0, log=True)
            method = PSigmoid(slope=slope, floor=trial.suggest_float("floor", 0.0, highest_floor), budget=budget)
            score, average = calibration.evaluate(method)
            trial.set_user_attr("visual", average)
            progress.advance(task)
            progress.console.print(f"trial {trial.number:3d}: slope {method.slope:6.2f}, floor {method.floor:.3f}: "
                                   f"accuracy {score:5.1f}%, {average:6.1f} visual tokens per layer")  # fmt: skip
            return score

        study.optimize(objective, n_trials=trials)
    best = study.best_trial
    method = PSigmoid(slope=best.params["slope"], floor=best.params["floor"], budget=budget)
    return Found(method, best.value, unpatched, best.user_attrs["visual"])


def write_schedule(found: Found, path: Path, notes: list[str]) -> None:
    """The method as YAML for `mmtoken.patch(model, path)`, headed by comments saying how it was found."""
    config = {"method": found.method.name}
    for field in fields(found.method):
        value = getattr(found.method, field.name)
        if value != field.default:
            config[field.name] = list(value) if isinstance(value, tuple) else value
    lines = [*notes, f"calibration accuracy {found.accuracy:.1f}% (unpatched {found.unpatched:.1f}%), "
             f"{found.visual:.1f} visual tokens per layer on average"]  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"# {line}\n" for line in lines) + yaml.safe_dump(config, sort_keys=False))
