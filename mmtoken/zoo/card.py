"""The model card of an embedded probe model: how it was trained, and proof that it looks at the image."""

from __future__ import annotations

import hashlib
import inspect
import json
from collections import defaultdict
from dataclasses import replace

from PIL import Image
from rich.progress import track

import mmtoken
from mmtoken.zoo import probe
from mmtoken.zoo.embedded import ask, load, path
from mmtoken.zoo.probe import Sample

BUDGETS = (192, 128, 64)
CARD_SEED = 20_261_122


def data_version() -> str:
    """A short hash of the probe generator's source: the same version renders the same samples."""
    return hashlib.sha256(inspect.getsource(probe).encode()).hexdigest()[:12]


def blanked(sample: Sample) -> Sample:
    """The sample with its image replaced by a flat grey one of the same size."""
    return replace(sample, images=[Image.new("RGB", image.size, (128, 128, 128)) for image in sample.images])


def accuracy(model, processor, samples: list[Sample], label: str) -> dict[str, float]:
    hits: dict[str, list[bool]] = defaultdict(list)
    for sample in track(samples, description=label):
        hits[sample.task].append(ask(model, processor, sample) == sample.answer)
    return {task: sum(results) / len(results) for task, results in hits.items()}


def evaluate(name: str, per_task: int, seed: int = CARD_SEED) -> dict[str, dict[str, float]]:
    """Per-task accuracy on a fresh seed: unpatched, with the image blanked, and under the random and uniform
    baselines at the papers' budgets."""
    model, processor = load(name)
    samples = probe.generate("image", n=per_task * len(probe.tasks("image")), seed=seed)
    rows = {
        "unpatched": accuracy(model, processor, samples, "unpatched"),
        "image blanked": accuracy(model, processor, [blanked(s) for s in samples], "blanked"),
    }
    for method in ("random", "uniform"):
        for budget in BUDGETS:
            with mmtoken.patched(model, method, budget=budget):
                rows[f"{method} @{budget}"] = accuracy(model, processor, samples, f"{method} @{budget}")
    return rows


def plot_curve(state: dict, path) -> None:
    """Answer loss and held-out accuracy per task over the training steps, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, (loss_axis, accuracy_axis) = pyplot.subplots(1, 2, figsize=(10, 3.6))
    loss_axis.plot([p["step"] for p in state["curve"]], [p["loss"] for p in state["curve"]], label="answer")
    loss_axis.plot([p["step"] for p in state["curve"]], [p["aux"] for p in state["curve"]], label="patch colour")
    loss_axis.set(xlabel="step", ylabel="loss", yscale="log", title="training loss")
    loss_axis.legend()
    steps = [evaluation["step"] for evaluation in state["evaluations"]]
    for task in state["evaluations"][-1]["accuracy"]:
        scores = [100 * evaluation["accuracy"][task] for evaluation in state["evaluations"]]
        accuracy_axis.plot(steps, scores, marker=".", label=task)
    accuracy_axis.set(xlabel="step", ylabel="accuracy, %", title="held-out accuracy (teacher-forced)")
    accuracy_axis.legend(fontsize=8)
    for axis in (loss_axis, accuracy_axis):
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def write_card(name: str, per_task: int = 30) -> str:
    """Evaluate `name` and write MODEL_CARD.md beside its weights; returns the card's text."""
    folder = path(name)
    state = json.loads((folder / "state.json").read_text())
    rows = evaluate(name, per_task)
    task_names = list(probe.tasks("image"))
    table = ["| setting | " + " | ".join(task_names) + " |", "|---|" + "---|" * len(task_names)]
    for setting, scores in rows.items():
        table.append(f"| {setting} | " + " | ".join(f"{100 * scores[task]:.0f}" for task in task_names) + " |")
    final = state["evaluations"][-1]["accuracy"] if state["evaluations"] else {}
    curve = [f"| {point['step']} | {point['loss']:.3f} | {point['aux']:.3f} |" for point in state["curve"][::20]]
    text = "\n".join(
        [
            f"# {name}",
            "",
            "A LLaVA-1.5-format model (CLIP ViT at 336 px with 14-px patches: 576 visual tokens; 6 layers, 256 wide,",
            "in the tower and in the Llama language model), trained from scratch on mmtoken's probe set. It exists to",
            "show what token-reduction methods throw away; it is not a general-purpose model.",
            "",
            f"- Data: `mmtoken.zoo.probe`, version `{data_version()}`; every step renders a fresh batch.",
            f"- Training: {state['step']} steps of {state['config']['batch_size']} samples "
            f"({state['samples']} in all), "
            f"{state['seconds'] / 60:.1f} minutes of training steps on {state['device']}, AdamW "
            f"{state['config']['lr']} with warm-up and cosine decay, auxiliary per-patch colour loss on the tower's "
            "penultimate layer.",
            "- Runs on the GPU (each stops at its step target or its time budget; a resumed run restarts AdamW "
            "with a warm-up):",
            *(
                f"  - from step {run['from_step']}: `mmtoken zoo train {name} --out DIR --steps {run['steps']} "
                f"--batch-size {run['batch_size']} --minutes {run['minutes']}"
                + (" --resume DIR`" if run["resumed"] else "`")
                for run in state.get("runs", [])
            ),
            f"- This card: `python -m mmtoken.zoo.card {name}` (CPU, a few minutes).",
            f"- Held-out accuracy at the last step (teacher-forced, {state['config']['eval_per_task']} per task): "
            + ", ".join(f"{task} {100 * value:.0f}%" for task, value in final.items()),
            "",
            f"## Accuracy (%) on a fresh seed ({CARD_SEED}), {per_task} samples per task, greedy answers",
            "",
            *table,
            "",
            "Chance: count 1/6, colour 1/7, locate 1/9, exist 1/2, read 1/1000, relation 1/4. Budgets are the",
            "average number of visual tokens per layer (of 576); random and uniform cut before the language model.",
            "",
            "## Training curve (every 1000 steps)",
            "",
            "| step | answer loss | patch loss |",
            "|---|---|---|",
            *curve,
            "",
        ]
    )
    plot_curve(state, folder / "training_curve.png")
    (folder / "MODEL_CARD.md").write_text(text)
    return text


if __name__ == "__main__":
    import sys

    print(write_card(sys.argv[1]))
