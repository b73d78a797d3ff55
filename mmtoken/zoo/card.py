"""The model card of a probe model: how it was trained, and proof that it looks at the image."""

from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import torch
from PIL import Image
from rich.progress import track
from transformers import AutoModelForImageTextToText, AutoProcessor

import mmtoken
from mmtoken.zoo.embedded import ACCURACY_FLOOR, answers, path, prompts
from mmtoken.zoo.embedded import accuracy as tally
from mmtoken.zoo.probe import Sample
from mmtoken.zoo.recipes import WORLDS

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CARD_SEED = 20_261_122
ABOUT = {
    "probe-llava": "A LLaVA-1.5-format model (CLIP ViT at 336 px with 14-px patches: 576 visual tokens; 6 layers, 256 "
    "wide, in the tower and in the Llama language model), trained from scratch on mmtoken's image probe tasks.",
    "probe-qwen2vl": "A Qwen2-VL-format model (ViT with 14-px patches over pairs of frames, 2 x 2 merge, M-RoPE; 6 "
    "layers, 256 wide, in the tower and in the Qwen2 language model), trained from scratch on mmtoken's image and "
    "video probe tasks, alternating batches: a 336-px image is 144 visual tokens, an 8-frame 224-px video 256.",
    "probe-llava-v2": "A LLaVA-1.5-format model (CLIP ViT at 336 px with 14-px patches: 576 visual tokens; an 8-layer "
    "256-wide tower, a 24-layer 128-wide Llama language model), its tower pretrained contrastively on captions of "
    "probe world v2, then trained on its image tasks.",
    "probe-qwen2vl-v2": "A Qwen2-VL-format model (ViT with 14-px patches over pairs of frames, 2 x 2 merge, M-RoPE; an "
    "8-layer 256-wide tower, a 24-layer 128-wide Qwen2 language model), its tower pretrained contrastively on "
    "captions of probe world v2, then trained on its image and video tasks, alternating batches.",
}
# The baselines' budgets: LLaVA-1.5 at the papers' 192 / 128 / 64 of 576, Qwen2-VL at 25 / 10 / 5 % of its tokens.
_LLAVA_BUDGETS = {f"@{n}": {"budget": n} for n in (192, 128, 64)}
_QWEN_BUDGETS = {f"@{round(100 * r)}%": {"ratio": r} for r in (0.25, 0.10, 0.05)}
BUDGETS = {"probe-llava": _LLAVA_BUDGETS, "probe-qwen2vl": _QWEN_BUDGETS, "probe-llava-v2": _LLAVA_BUDGETS,
           "probe-qwen2vl-v2": _QWEN_BUDGETS}  # fmt: skip
CHANCE = {"count": "1/6", "color": "1/7", "locate": "1/9", "exist": "1/2", "read": "1/1000", "relation": "1/4",
          "motion": "1/4", "order": "1/2", "events": "1/4", "needle": "1/7", "shape": "1/3", "material": "1/3",
          "size": "1/2"}  # fmt: skip


def data_version(world: ModuleType) -> str:
    """A short hash of a probe world's source: the same version renders the same samples."""
    return hashlib.sha256(inspect.getsource(world).encode()).hexdigest()[:12]


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


def evaluate(name: str, folder: Path, kind: str, per_task: int, seed: int = CARD_SEED) -> dict[str, dict[str, float]]:
    """Per-task accuracy of the probe model `name` in `folder` on a fresh seed of `kind` samples of its world:
    unpatched, with the media blanked, and under the random and uniform baselines at the model's budgets."""
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32, local_files_only=True).eval()
    processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    world = WORLDS[name]
    samples = world.generate(kind, n=per_task * len(world.tasks(kind)), seed=seed)
    rows = {
        "unpatched": accuracy(model, processor, samples, f"{kind} unpatched"),
        f"{kind} blanked": accuracy(model, processor, [blanked(s) for s in samples], f"{kind} blanked"),
    }
    for method in ("random", "uniform"):
        for label, budget in BUDGETS[name].items():
            with mmtoken.patched(model, method, **budget):
                rows[f"{method} {label}"] = accuracy(model, processor, samples, f"{kind} {method} {label}")
    return rows


def plot_curve(state: dict, path) -> Figure:
    """Answer loss and held-out accuracy per task over the training steps, with the mean accuracy when each
    question is asked of another sample's media, as a PNG; returns the figure."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, (loss_axis, accuracy_axis) = pyplot.subplots(1, 2, figsize=(10, 3.6))
    images = [p for p in state["curve"] if p.get("kind", "image") == "image"]
    videos = [p for p in state["curve"] if p.get("kind") == "video"]
    loss_axis.plot([p["step"] for p in images], [p["loss"] for p in images], label="answer, images")
    if videos:
        loss_axis.plot([p["step"] for p in videos], [p["loss"] for p in videos], label="answer, videos")
    if any(p["aux"] for p in images):  # v1's patch-colour loss; v2 has none
        loss_axis.plot([p["step"] for p in images], [p["aux"] for p in images], label="patch colour")
    loss_axis.set(xlabel="step", ylabel="loss", yscale="log", title="training loss")
    loss_axis.legend()
    steps = [evaluation["step"] for evaluation in state["evaluations"]]
    for task in state["evaluations"][-1]["accuracy"]:
        scores = [100 * evaluation["accuracy"][task] for evaluation in state["evaluations"]]
        accuracy_axis.plot(steps, scores, marker=".", label=task)
    swapped = [evaluation for evaluation in state["evaluations"] if "swapped_media" in evaluation]
    if swapped:  # the questions asked of other samples' media: where the model answers without looking
        means = [100 * sum(e["swapped_media"].values()) / len(e["swapped_media"]) for e in swapped]
        accuracy_axis.plot([e["step"] for e in swapped], means, "k--", label="mean, media swapped")
    accuracy_axis.set(xlabel="step", ylabel="accuracy, %", title="held-out accuracy (teacher-forced)")
    accuracy_axis.legend(fontsize=8)
    for axis in (loss_axis, accuracy_axis):
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return figure


def accuracy_table(rows: dict[str, dict[str, float]], kind: str) -> list[str]:
    """The card's table of one kind of media: a row per setting, a column per task; chance and the tasks below
    the floor."""
    tasks = list(rows["unpatched"])
    table = ["| setting | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for setting, scores in rows.items():
        table.append(f"| {setting} | " + " | ".join(f"{scores[task]:.0f}" for task in tasks) + " |")
    floor = ACCURACY_FLOOR[kind]
    below = [task for task in tasks if rows["unpatched"][task] < floor]
    notes = ["", "Chance: " + ", ".join(f"{task} {CHANCE[task]}" for task in tasks) + ".", ""]
    if below:
        group = "`mmtoken.zoo.embedded.RELIABLE_TASKS`"
        notes += [f"Below the {floor}% floor unpatched: {', '.join(below)}; these stay out of the model's default "
                  f"probe group ({group}) until more training gets them there.", ""]  # fmt: skip
    return [*table, *notes]


def _options(run: dict) -> str:
    """A run's schedule as the command-line options that repeat it."""
    minutes = "" if run["minutes"] is None else f" --minutes {run['minutes']}"
    return f"--steps {run['steps']} --batch-size {run['batch_size']}{minutes}"


def _training(name: str, state: dict) -> list[str]:
    """The card's lines on how the model was trained: its tower's pretraining, if any, then every run."""
    lines = []
    pretrained = state.get("pretrained")
    if pretrained is not None:
        retrieval = pretrained["retrieval"]
        lines += [f"- Tower pretraining: {pretrained['step']} steps ({pretrained['samples']} images), "
                  f"{pretrained['seconds'] / 60:.1f} minutes, contrastive on captions (CLIP's objective); held-out "
                  f"caption retrieval at the end: {'not measured' if retrieval is None else f'{100 * retrieval:.0f}%'}"
                  " top-1 of its batch. Runs:"]  # fmt: skip
        lines += [f"  - from step {run['from_step']}: `mmtoken zoo pretrain {name} --out TOWER {_options(run)}"
                  + (" --resume TOWER`" if run["resumed"] else "`") for run in pretrained["runs"]]  # fmt: skip
    auxiliary = ("; the pretrained vision encoder frozen, the projector and language model trained"
                 if pretrained is not None else
                 ", auxiliary per-patch colour loss on the tower's penultimate layer (image batches)")  # fmt: skip
    lines += [f"- Training: {state['step']} steps of {state['config']['batch_size']} samples ({state['samples']} in "
              f"all), {state['seconds'] / 60:.1f} minutes of training steps on {state['device']}, AdamW "
              f"{state['config']['lr']} with warm-up and cosine decay{auxiliary}.",
              "- Runs on the GPU (each stops at its step target or its time budget; a resumed run restarts AdamW "
              "with a warm-up):"]  # fmt: skip
    start = " --pretrained TOWER" if pretrained is not None else ""
    for run in state.get("runs", []):
        lines.append(f"  - from step {run['from_step']}: `mmtoken zoo train {name} --out DIR {_options(run)}"
                     + (" --resume DIR`" if run["resumed"] else f"{start}`"))  # fmt: skip
    return lines


def write_card(name: str, per_task: int = 30, folder: Path | None = None) -> str:
    """Evaluate the probe model `name` (the embedded one, or the checkpoint in `folder`) and write MODEL_CARD.md and
    its training-curve plot beside its weights; returns the text."""
    folder = path(name) if folder is None else folder
    world = WORLDS[name]
    state = json.loads((folder / "state.json").read_text())
    kinds = ("image", "video") if any(p.get("kind") == "video" for p in state["curve"]) else ("image",)
    tables = {kind: evaluate(name, folder, kind, per_task) for kind in kinds}
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
            f"- Data: `{world.__name__}`, version `{data_version(world)}`; every step renders a fresh batch.",
            *_training(name, state),
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
                    *accuracy_table(rows, kind),
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

    parser = argparse.ArgumentParser(description="evaluate a probe model and write its model card")
    parser.add_argument("name", choices=sorted(WORLDS))
    parser.add_argument("--per-task", type=int, default=30, help="fresh samples per task and setting")
    parser.add_argument("--folder", type=Path, help="a checkpoint folder (default: the embedded model)")
    arguments = parser.parse_args()
    print(write_card(arguments.name, arguments.per_task, arguments.folder))
