"""Training a probe model on probe batches rendered on the fly on the training device; resumable.

Each step renders a fresh batch of the recipe's world (so the data never repeats; a model that reads videos
alternates image and video batches) and trains on the answer tokens. On probe world v1 it adds an auxiliary loss
on image batches that asks the vision tower's penultimate layer to name the colour under each patch, which makes
the tower look at every patch early; a v2 recipe starts instead from a tower pretrained on captions
(:mod:`mmtoken.zoo.pretrain`) and keeps that encoder frozen, training the projector and the language model, as
LLaVA's second stage does (the first H200 run, which trained it too, lost part of what a linear probe reads from
its patches: README, probe zoo v2). Checkpoints are plain `save_pretrained` folders (bf16 weights in shards under
16 MB) plus `state.json`; resuming restarts the optimiser with a short warm-up.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, replace
from functools import cache
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForImageTextToText, AutoProcessor, PreTrainedModel, ProcessorMixin

from mmtoken.graphs.segments import SEGMENT_ATTENTION
from mmtoken.zoo import probe
from mmtoken.zoo.formats import LlavaFormat, QwenFormat, probe_format
from mmtoken.zoo.probe import Batch
from mmtoken.zoo.recipes import RECIPES, WORLDS

IGNORE = -100
PATCH_CLASSES = 16
PATCH_HEAD = "patch_head.pt"


@dataclass
class Schedule:
    """The optimisation settings every training run has (kept in `state.json`)."""

    steps: int = 6000
    batch_size: int = 128
    lr: float = 6e-4
    warmup: int = 300
    seed: int = 0
    eval_every: int = 500
    minutes: float | None = None


@dataclass
class TrainConfig(Schedule):
    """Settings of one question-answering run: the schedule, the weight of v1's patch-colour loss, the held-out
    samples per task."""

    aux_weight: float = 0.3
    eval_per_task: int = 64


class PromptEncoder:
    """Token ids of probe questions and answers exactly as the model's processor and chat template make them."""

    def __init__(self, processor: ProcessorMixin, model_format: LlavaFormat | QwenFormat) -> None:
        self.processor, self.tokenizer, self.format = processor, processor.tokenizer, model_format
        self.prompt_ids = cache(self._prompt_ids)

    def _prompt_ids(self, question: str, kind: str = "image") -> tuple[int, ...]:
        messages = [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": question}]}]
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        placeholder = getattr(self.tokenizer, f"{kind}_token_id")
        ids = []
        for token in self.tokenizer(text)["input_ids"]:
            ids.extend([token] * (self.format.visual_tokens(kind) if token == placeholder else 1))
        return tuple(ids)

    def answer_ids(self, answer: str) -> list[int]:
        return [*self.tokenizer(answer, add_special_tokens=False)["input_ids"], self.tokenizer.eos_token_id]

    def encode(self, batch: Batch, kind: str, device: torch.device) -> dict[str, torch.Tensor]:
        """Left-padded input ids, attention mask and labels (answer tokens only), and position ids where the
        model's format takes them."""
        rows = [(list(self.prompt_ids(q, kind)), self.answer_ids(a)) for q, a in zip(batch.questions, batch.answers,
                                                                                      strict=True)]  # fmt: skip
        length = max(len(prompt) + len(answer) for prompt, answer in rows)
        ids = torch.full((len(rows), length), self.tokenizer.pad_token_id)
        labels = torch.full((len(rows), length), IGNORE)
        for row, (prompt, answer) in enumerate(rows):
            sequence = prompt + answer
            ids[row, length - len(sequence) :] = torch.tensor(sequence)
            labels[row, length - len(answer) :] = torch.tensor(answer)
        mask = (torch.arange(length) >= length - torch.tensor([len(p) + len(a) for p, a in rows])[:, None]).long()
        inputs = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if self.format.takes_position_ids:
            inputs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        if "mm_token_type_ids" in self.processor.model_input_names:  # M-RoPE needs to know image from video
            inputs["mm_token_type_ids"] = (ids == self.tokenizer.image_token_id) + 2 * (
                ids == self.tokenizer.video_token_id
            )
        return {key: value.to(device) for key, value in inputs.items()}


class PatchProbe(nn.Module):
    """The auxiliary head: the colour under each patch, read from the vision tower's penultimate layer."""

    def __init__(self, model: PreTrainedModel, model_format: LlavaFormat | QwenFormat) -> None:
        super().__init__()
        self.format = model_format
        self.head = nn.Linear(model.config.vision_config.hidden_size, PATCH_CLASSES)
        self.features: torch.Tensor | None = None
        model_format.patch_layer().register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, args: tuple, output: object) -> None:
        self.features = output[0] if isinstance(output, tuple) else output

    def loss(self, labels: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.format.patch_features(self.features).float())
        return nn.functional.cross_entropy(logits, self.format.patch_targets(labels))


def learning_rate(step: int, start: int, config: Schedule) -> float:
    """Linear warm-up (again after a resume), then cosine decay to a tenth."""
    warm = min(1.0, (step - start + 1) / config.warmup)
    progress = min(1.0, step / config.steps)
    return config.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def answer_accuracy(model: PreTrainedModel, encoder: PromptEncoder, batch: Batch, kind: str) -> float:
    """Exact-match accuracy of the answers under teacher forcing (equal to greedy decoding's)."""
    inputs = encoder.encode(batch, kind, batch.pixels.device)
    labels = inputs.pop("labels")
    with torch.autocast(batch.pixels.device.type, dtype=torch.bfloat16, enabled=batch.pixels.is_cuda):
        logits = model(**inputs, **encoder.format.vision_inputs(batch, kind)).logits
    predicted, target = logits[:, :-1].argmax(-1), labels[:, 1:]
    answered = target != IGNORE
    return float(((predicted == target) | ~answered).all(-1).float().mean())


def token_similarity(features: torch.Tensor) -> float:
    """The mean cosine similarity between two different visual tokens of one image (`features` (n, tokens,
    width)): near 1, the language model reads tokens that look alike, whatever the scene holds where."""
    unit = torch.nn.functional.normalize(features.float(), dim=-1)
    tokens = unit.shape[1]
    pairs = unit @ unit.transpose(1, 2)
    return float((pairs.sum((1, 2)) - pairs.diagonal(dim1=1, dim2=2).sum(1)).mean() / (tokens * (tokens - 1)))


def evaluation_batches(name: str, kinds: tuple[str, ...], config: TrainConfig, device: torch.device) -> dict:
    """A fixed held-out batch per task of each kind of the recipe's world, from a seed apart from training's."""
    world = WORLDS[name]
    generator = torch.Generator(device=device).manual_seed(10_000 + config.seed)
    return {(kind, task): world.render_batch(kind, config.eval_per_task, generator, device, task=task)
            for kind in kinds for task in world.tasks(kind)}  # fmt: skip


def new_state(name: str, **extra: object) -> dict:
    """The state of a run that starts from nothing."""
    return {"name": name, "step": 0, "samples": 0, "seconds": 0.0, "curve": [], "evaluations": [], "runs": [], **extra}


def load_checkpoint(folder: Path) -> tuple[PreTrainedModel, ProcessorMixin, dict]:
    """The model (fp32), processor and state of a checkpoint folder."""
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
    return model, AutoProcessor.from_pretrained(folder), json.loads((folder / "state.json").read_text())


def train(
    name: str, out: Path, config: TrainConfig, resume: Path | None = None, pretrained: Path | None = None
) -> dict:
    """Train `name` into `out`, from scratch, from the checkpoint `resume` of this run, or from the tower
    pretraining checkpoint `pretrained`; returns the final state (steps, curve, per-task accuracy). A model that
    reads images and videos alternates between an image batch and a video batch."""
    if resume is not None and pretrained is not None:
        raise ValueError("give resume (a run to continue) or pretrained (a tower to start from), not both")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if resume is not None:
        model, processor, state = load_checkpoint(resume)
    elif pretrained is not None:
        model, processor, tower = load_checkpoint(pretrained)
        if tower.get("stage") != "pretrain" or tower["name"] != name:
            raise ValueError(f"{pretrained} is not a tower pretraining checkpoint of {name}")
        last = tower["evaluations"][-1] if tower["evaluations"] else {}
        summary = {key: tower[key] for key in ("step", "samples", "seconds", "runs")}
        state = new_state(name, pretrained={**summary, "retrieval": last.get("retrieval")})
    else:
        model, processor = RECIPES[name]()
        state = new_state(name)
    state["config"] = asdict(config)
    state["runs"] = [
        *state.get("runs", []),
        {"from_step": state["step"], "resumed": resume is not None, **asdict(config)},
    ]
    model.to(device).train()
    model_format = probe_format(model, processor)
    if isinstance(model_format, QwenFormat):
        model.model.visual.config._attn_implementation = SEGMENT_ATTENTION
    world = WORLDS[name]
    patch_probe = PatchProbe(model, model_format).to(device) if world is probe else None  # v1's patch labels
    heads = {} if patch_probe is None else {PATCH_HEAD: patch_probe.head}
    if resume is not None and (resume / PATCH_HEAD).exists() and patch_probe is not None:
        patch_probe.head.load_state_dict(torch.load(resume / PATCH_HEAD, map_location=device))
    encoder = PromptEncoder(processor, model_format)
    if state.get("pretrained") is not None:  # a pretrained vision encoder stays as pretrained, resumed runs too
        for parameter in model_format.encoder_parameters():
            parameter.requires_grad_(False)
    trained = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW([*trained, *(p for h in heads.values() for p in h.parameters())],
                                  lr=config.lr, betas=(0.9, 0.98), weight_decay=0.05)  # fmt: skip
    generator = torch.Generator(device=device).manual_seed(config.seed * 1_000_003 + state["step"])
    held_out = evaluation_batches(name, model_format.kinds, config, device)
    if state.get("pretrained") is not None and "token_similarity" not in state["pretrained"]:
        # the pretraining scored the projector's mean over tokens only: are its tokens still told apart?
        with torch.no_grad():
            features = model_format.image_features(next(b for (kind, _), b in held_out.items() if kind == "image"))
        state["pretrained"]["token_similarity"] = token_similarity(features)
        print(json.dumps({"pretrained_token_similarity": state["pretrained"]["token_similarity"]}), flush=True)
    start, began = state["step"], time.perf_counter()
    for step in range(start, config.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, start, config)
        kind = model_format.kinds[step % len(model_format.kinds)]
        batch = world.render_batch(kind, config.batch_size, generator, device)
        inputs = encoder.encode(batch, kind, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            answer_loss = model(**inputs, **model_format.vision_inputs(batch, kind)).loss
            # the per-patch colour labels exist for v1's images only
            labelled = patch_probe is not None and kind == "image"
            aux_loss = patch_probe.loss(batch.patch_labels) if labelled else answer_loss.new_zeros(())
        loss = answer_loss + config.aux_weight * aux_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        state["step"], state["samples"] = step + 1, state["samples"] + config.batch_size
        if (step + 1) % 50 < len(model_format.kinds):  # the last step of each kind in every 50
            elapsed = time.perf_counter() - began
            state["curve"].append({"step": step + 1, "kind": kind, "loss": answer_loss.item(), "aux": aux_loss.item(),
                                   "samples_per_s": (step + 1 - start) * config.batch_size / elapsed})  # fmt: skip
            print(json.dumps(state["curve"][-1]), flush=True)
        out_of_time = config.minutes is not None and time.perf_counter() - began > 60 * config.minutes
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps or out_of_time:
            model.eval()
            accuracy = {task: answer_accuracy(model, encoder, batch, kind) for (kind, task), batch in held_out.items()}
            # each question asked of another sample's image: what the model answers without looking stays as high
            swapped = {task: answer_accuracy(model, encoder, replace(batch, pixels=batch.pixels.roll(1, 0)), kind)
                       for (kind, task), batch in held_out.items()}  # fmt: skip
            model.train()
            state["evaluations"].append({"step": step + 1, "accuracy": accuracy, "swapped_media": swapped})
            print(json.dumps(state["evaluations"][-1]), flush=True)
            save(model, processor, state, out, time.perf_counter() - began, heads)
        if out_of_time:
            break
    return state


def save(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    state: dict,
    out: Path,
    seconds: float,
    heads: dict[str, nn.Module],
) -> None:
    """A resumable checkpoint that is also the shippable model: bf16 shards under 16 MB, processor, the training
    heads (file name to module; each file under 16 MB), state."""
    out.mkdir(parents=True, exist_ok=True)
    state = {**state, "seconds": state["seconds"] + seconds,
             "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}  # fmt: skip
    weights = {key: value.to(torch.bfloat16) for key, value in model.state_dict().items()}
    model.save_pretrained(out, state_dict=weights, max_shard_size="15MB")
    processor.save_pretrained(out)
    for file, head in heads.items():
        torch.save(head.state_dict(), out / file)
    (out / "state.json").write_text(json.dumps(state, indent=1))
