"""The model card of an embedded probe model: how it was trained, and proof that it looks at the image."""

from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import replace

from PIL import Image
from rich.progress import track

import mmtoken
from mmtoken.zoo import probe
from mmtoken.zoo.embedded import ACCURACY_FLOOR, answers, load, path, prompts
from mmtoken.zoo.embedded import accuracy as tally
from mmtoken.zoo.probe import Sample

CARD_SEED = 20_261_122
ABOUT = {
    "probe-llava": "A LLaVA-1.5-format model (CLIP ViT at 336 px with 14-px patches: 576 visual tokens; 6 layers, 256 "
    "wide, in the tower and in the Llama language model), trained from scratch on mmtoken's image probe tasks.",
    "probe-qwen2vl": "A Qwen2-VL-format model (ViT with 14-px patches over pairs of frames, 2 x 2 merge, M-RoPE; 6 "
    "layers, 256 wide, in the tower and in the Qwen2 language model), trained from scratch on mmtoken's image and "
    "video probe tasks, alternating batches: a 336-px image is 144 visual tokens, an 8-frame 224-px video 256.",
}
# The baselines' budgets: LLaVA-1.5 at the papers' 192 / 128 / 64 of 576, Qwen2-VL at 25 / 10 / 5 % of its tokens.
BUDGETS = {
    "probe-llava": {f"@{n}": {"budget": n} for n in (192, 128, 64)},
    "probe-qwen2vl": {f"@{round(100 * r)}%": {"ratio": r} for r in (0.25, 0.10, 0.05)},
}
CHANCE = {"count": "1/6", "color": "1/7", "locate": "1/9", "exist": "1/2", "read": "1/1000", "relation": "1/4",
          "motion": "1/4", "order": "1/2", "events": "1/4", "needle": "1/7"}  # fmt: skip


def data_version() -> str:
    """A short hash of the probe generator's source: the same version renders the same samples."""
    return hashlib.sha256(inspect.getsource(probe).encode()).hexdigest()[:12]


def blanked(sample: Sample) -> Sample:
    """The sample with its image, or every frame of its video, replaced by flat grey of the same size."""

    def grey(frames: list[Image.Image] | None) -> list[Image.Image] | None:
        return None if frames is None else [Image.new("RGB", frame.size, (128, 128, 128)) for frame in frames]

    return replace(sample, images=grey(sample.images), video=grey(sample.video))


def accuracy(model, processor, samples: list[Sample], label: str, batch_size: int = 16) -> dict[str, float]:
    """Accuracy % per task of the model's greedy answers, asked in batches."""
    given = []
    for start in track(range(0, len(samples), batch_size), description=label):
        batch = samples[start : start + batch_size]
        given += answers(model, processor, prompts(processor, batch).to(model.device))
    scores = tally(samples, given)
    del scores["average"]
    return scores


def evaluate(name: str, kind: str, per_task: int, seed: int = CARD_SEED) -> dict[str, dict[str, float]]:
    """Per-task accuracy on a fresh seed of `kind` samples: unpatched, with the media blanked, and under the
    random and uniform baselines at the model's budgets."""
    model, processor = load(name)
    samples = probe.generate(kind, n=per_task * len(probe.tasks(kind)), seed=seed)
    rows = {
        "unpatched": accuracy(model, processor, samples, f"{kind} unpatched"),
        f"{kind} blanked": accuracy(model, processor, [blanked(s) for s in samples], f"{kind} blanked"),
    }
    for method in ("random", "uniform"):
        for label, budget in BUDGETS[name].items():
            with mmtoken.patched(model, method, **budget):
                rows[f"{method} {label}"] = accuracy(model, processor, samples, f"{kind} {method} {label}")
    return rows


def plot_curve(state: dict, path) -> None:
    """Answer loss and held-out accuracy per task over the training steps, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, (loss_axis, accuracy_axis) = pyplot.subplots(1, 2, figsize=(10, 3.6))
    images = [p for p in state["curve"] if p.get("kind", "image") == "image"]
    videos = [p for p in state["curve"] if p.get("kind") == "video"]
    loss_axis.plot([p["step"] for p in images], [p["loss"] for p in images], label="answer, images")
    if videos:
        loss_axis.plot([p["step"] for p in videos], [p["loss"] for p in videos], label="answer, videos")
    loss_axis.plot([p["step"] for p in images], [p["aux"] for p in images], label="patch colour")
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


def accuracy_table(rows: dict[str, dict[str, float]]) -> list[str]:
    tasks = list(rows["unpatched"])
    table = ["| setting | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for setting, scores in rows.items():
        table.append(f"| {setting} | " + " | ".join(f"{scores[task]:.0f}" for task in tasks) + " |")
    floor = ACCURACY_FLOOR["image" if tasks[0] in probe.tasks("image") else "video"]
    below = [task for task in tasks if rows["unpatched"][task] < floor]
    notes = ["", "Chance: " + ", ".join(f"{task} {CHANCE[task]}" for task in tasks) + ".", ""]
    if below:
        group = "`mmtoken.zoo.embedded.RELIABLE_TASKS`"
        notes += [f"Below the {floor}% floor unpatched: {', '.join(below)}; these stay out of the model's default "
                  f"probe group ({group}) until more training gets them there.", ""]  # fmt: skip
    return [*table, *notes]


def write_card(name: str, per_task: int = 30) -> str:
    """Evaluate `name` and write MODEL_CARD.md and its training-curve plot beside its weights; returns the text."""
    folder = path(name)
    state = json.loads((folder / "state.json").read_text())
    kinds = ("image", "video") if any(p.get("kind") == "video" for p in state["curve"]) else ("image",)
    tables = {kind: evaluate(name, kind, per_task) for kind in kinds}
    final = state["evaluations"][-1]["accuracy"] if state["evaluations"] else {}
    curve = [
        f"| {p['step']} | {p.get('kind', 'image')} | {p['loss']:.3f} | {p['aux']:.3f} |" for p in state["curve"][::20]
    ]
    resumes = [run["from_step"] for run in state.get("runs", []) if run["resumed"]]
    text = "\n".join(
        [
            f"# {name}",
            "",
            ABOUT[name] + " It exists to show what token-reduction methods throw away; it is not a general-purpose"
            " model.",
            "",
            f"- Data: `mmtoken.zoo.probe`, version `{data_version()}`; every step renders a fresh batch.",
            f"- Training: {state['step']} steps of {state['config']['batch_size']} samples "
            f"({state['samples']} in all), "
            f"{state['seconds'] / 60:.1f} minutes of training steps on {state['device']}, AdamW "
            f"{state['config']['lr']} with warm-up and cosine decay, auxiliary per-patch colour loss on the tower's "
            "penultimate layer (image batches).",
            "- Runs on the GPU (each stops at its step target or its time budget; a resumed run restarts AdamW "
            "with a warm-up):",
            *(
                f"  - from step {run['from_step']}: `mmtoken zoo train {name} --out DIR --steps {run['steps']} "
                f"--batch-size {run['batch_size']} --minutes {run['minutes']}"
                + (" --resume DIR`" if run["resumed"] else "`")
                for run in state.get("runs", [])
            ),
            f"- This card: `python -m mmtoken.zoo.card {name} --per-task {per_task}` (CPU).",
            f"- Held-out accuracy at the last step (teacher-forced, {state['config']['eval_per_task']} per task): "
            + ", ".join(f"{task} {100 * value:.0f}%" for task, value in final.items()),
            "",
            *(
                line
                for kind, rows in tables.items()
                for line in [
                    f"## {kind.capitalize()} accuracy (%) on a fresh seed ({CARD_SEED}), {per_task} samples per task,"
                    " greedy answers",
                    "",
                    *accuracy_table(rows),
                ]
            ),
            "Budgets: " + ", ".join(BUDGETS[name]) + " visual tokens per language-model layer (an absolute count, or a"
            " share of the sample's visual tokens); random and uniform cut before the language model.",
            "",
            "## Training curve",
            "",
            "![training curve](training_curve.png)",
            "",
            *(
                [f"Runs resume at steps {', '.join(map(str, resumes))}; each restarts AdamW with a warm-up.", ""]
                if resumes
                else []
            ),
            "| step | batch | answer loss | patch loss |",
            "|---|---|---|---|",
            *curve,
            "",
        ]
    )
    plot_curve(state, folder / "training_curve.png")
    (folder / "MODEL_CARD.md").write_text(text)
    return text


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="evaluate an embedded probe model and write its model card")
    parser.add_argument("name")
    parser.add_argument("--per-task", type=int, default=30, help="fresh samples per task and setting")
    arguments = parser.parse_args()
    print(write_card(arguments.name, arguments.per_task))
