"""Contrastive pretraining of a v2 probe model's vision tower on captions of probe world v2, before the question
answering; resumable.

CLIP (Radford et al., 2021) trains its tower to pick an image's caption out of a batch. Each caption of probe world
v2 names every object with its size, colour, material, shape and cell, and the sign's code, so the tower (and the
projector or merger, whose mean-pooled output is the image's embedding) learns what whole scenes hold. Its tokens
then carry context beyond their own patch, as CLIP's and SigLIP's do, and unlike version 1's towers, trained from
scratch with a per-patch colour loss. The caption encoder is a small transformers `CLIPTextModel` over the probe
tokenizer. A checkpoint is the whole probe model (language model still untrained) plus the caption encoder's
weights and `state.json`; :func:`mmtoken.zoo.train.train` starts the question answering from it.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

from mmtoken.zoo import world
from mmtoken.zoo.formats import probe_format
from mmtoken.zoo.recipes import RECIPES, WORLDS
from mmtoken.zoo.train import Schedule, learning_rate, load_checkpoint, new_state, save

CAPTION_ENCODER = "caption_encoder.pt"
CAPTION_LENGTH = 96  # 9 objects of 6 words, 8 "and", a sign of 4 words, the end token: 67


@dataclass
class PretrainConfig(Schedule):
    """Settings of one tower pretraining run: the schedule and the held-out batch for retrieval accuracy."""

    steps: int = 3000
    batch_size: int = 256
    lr: float = 5e-4
    warmup: int = 200
    eval_batch: int = 256


class CaptionEncoder(nn.Module):
    """CLIP's text side and both projections: captions and pooled image features to unit vectors in one space,
    with a learned temperature."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast, image_width: int, width: int = 128, dim: int = 128):
        super().__init__()
        self.tokenizer = tokenizer
        config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=4 * width,
                                num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=CAPTION_LENGTH,
                                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=tokenizer.eos_token_id)  # fmt: skip
        self.text = CLIPTextModel(config)
        self.text_projection = nn.Linear(width, dim, bias=False)
        self.image_projection = nn.Linear(image_width, dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def tokens(self, captions: list[str], device: torch.device) -> tuple[Tensor, Tensor]:
        """Right-padded ids (each caption ending with the end token) and the end token's position per caption."""
        rows = [[*self.tokenizer(c, add_special_tokens=False)["input_ids"], self.tokenizer.eos_token_id]
                for c in captions]  # fmt: skip
        if max(map(len, rows)) > CAPTION_LENGTH:
            raise ValueError(f"a caption is longer than {CAPTION_LENGTH} tokens")
        ids = torch.full((len(rows), max(map(len, rows))), self.tokenizer.pad_token_id)
        for row, tokens in enumerate(rows):
            ids[row, : len(tokens)] = torch.tensor(tokens)
        return ids.to(device), torch.tensor([len(r) - 1 for r in rows], device=device)

    def embed_captions(self, captions: list[str], device: torch.device) -> Tensor:
        ids, end = self.tokens(captions, device)
        mask = (torch.arange(ids.shape[1], device=device) <= end[:, None]).long()
        hidden = self.text(input_ids=ids, attention_mask=mask).last_hidden_state
        # the end token's state, read at its position (CLIPTextModel's own pooling assumes its vocabulary)
        return nn.functional.normalize(self.text_projection(hidden[torch.arange(len(ids)), end]), dim=-1)

    def embed_images(self, features: Tensor) -> Tensor:
        """(n, tokens, width) features the language model would read -> (n, dim) unit vectors."""
        return nn.functional.normalize(self.image_projection(features.float().mean(1)), dim=-1)

    def logits(self, images: Tensor, captions: Tensor) -> Tensor:
        """(n, n) image-to-caption similarities, scaled."""
        return self.logit_scale.clamp(max=math.log(100)).exp() * images @ captions.T


def contrastive_loss(logits: Tensor) -> Tensor:
    """CLIP's symmetric cross-entropy: each image picks its caption, each caption its image."""
    target = torch.arange(len(logits), device=logits.device)
    return (nn.functional.cross_entropy(logits, target) + nn.functional.cross_entropy(logits.T, target)) / 2


@torch.no_grad()
def retrieval(logits: Tensor) -> float:
    """Top-1 accuracy of picking the right caption for each image (chance: 1 / n)."""
    return float((logits.argmax(1) == torch.arange(len(logits), device=logits.device)).float().mean())


def pretrain(name: str, out: Path, config: PretrainConfig, resume: Path | None = None) -> dict:
    """Pretrain the tower of the v2 recipe `name` into `out`, or continue the run checkpointed in `resume`;
    returns the state (steps, curve, retrieval accuracy on a held-out batch)."""
    if WORLDS.get(name) is not world:
        raise ValueError(f"tower pretraining needs a probe world v2 recipe; {name!r} is not one "
                         f"(v2: {', '.join(n for n, w in WORLDS.items() if w is world)})")  # fmt: skip
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if resume is None:
        model, processor = RECIPES[name]()
        state = new_state(name, stage="pretrain")
    else:
        model, processor, state = load_checkpoint(resume)
    state["config"] = asdict(config)
    state["runs"] = [*state["runs"], {"from_step": state["step"], "resumed": resume is not None, **asdict(config)}]
    model.to(device).train()
    model_format = probe_format(model, processor)
    encoder = CaptionEncoder(processor.tokenizer, model.config.text_config.hidden_size).to(device)
    if resume is not None:
        encoder.load_state_dict(torch.load(resume / CAPTION_ENCODER, map_location=device))
    tower = [p for n, p in model.named_parameters() if "language_model" not in n and "lm_head" not in n]
    optimizer = torch.optim.AdamW([*tower, *encoder.parameters()], lr=config.lr, betas=(0.9, 0.98),
                                  weight_decay=0.05)  # fmt: skip
    generator = torch.Generator(device=device).manual_seed(config.seed * 1_000_003 + state["step"])
    held_out = world.render_batch("image", config.eval_batch, torch.Generator(device).manual_seed(10_000), device)
    start, began = state["step"], time.perf_counter()
    for step in range(start, config.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, start, config)
        batch = world.render_batch("image", config.batch_size, generator, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            images = encoder.embed_images(model_format.image_features(batch))
            loss = contrastive_loss(encoder.logits(images, encoder.embed_captions(batch.captions, device)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tower, 1.0)
        optimizer.step()
        state["step"], state["samples"] = step + 1, state["samples"] + config.batch_size
        if (step + 1) % 50 == 0 or step == start:
            elapsed = time.perf_counter() - began
            state["curve"].append({"step": step + 1, "loss": loss.item(),
                                   "samples_per_s": (step + 1 - start) * config.batch_size / elapsed})  # fmt: skip
            print(json.dumps(state["curve"][-1]), flush=True)
        out_of_time = config.minutes is not None and time.perf_counter() - began > 60 * config.minutes
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps or out_of_time:
            model.eval()
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                images = encoder.embed_images(model_format.image_features(held_out))
                accuracy = retrieval(encoder.logits(images, encoder.embed_captions(held_out.captions, device)))
            model.train()
            state["evaluations"].append({"step": step + 1, "retrieval": accuracy})
            print(json.dumps(state["evaluations"][-1]), flush=True)
            save(model, processor, state, out, time.perf_counter() - began, {CAPTION_ENCODER: encoder})
        if out_of_time:
            break
    return state
