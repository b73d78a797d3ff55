"""lmms-eval model `mmtoken`: a transformers VLM patched by an mmtoken method, as an lmms-eval chat model.

Registered through the `lmms_eval.models` entry point (`MANIFEST`), so the stock CLI finds it:
`python -m lmms_eval --model mmtoken --model_args pretrained=probe-llava,method=pdrop,ratio=0.25 ...`.
Importing this module needs lmms-eval (the `eval` extra); nothing else in mmtoken imports it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch
from accelerate import Accelerator
from lmms_eval import utils
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from lmms_eval.protocol import ChatMessages
from PIL import Image
from tqdm import tqdm
from transformers import AutoModelForImageTextToText, AutoProcessor, PreTrainedModel, ProcessorMixin
from transformers.video_utils import VideoMetadata, load_video

import mmtoken
from mmtoken.methods import build
from mmtoken.zoo import embedded
from mmtoken.zoo.formats import probe_format

MANIFEST = ModelManifest(model_id="mmtoken", chat_class_path="mmtoken.evaluation.lmms_model.MmtokenModel")
UNPATCHED = "none"
# The unpatched model runs under a patch that keeps every token (the same outputs, tested in test_invariants), so
# its samples log the same stats as a method's; its prefill time includes the hooks' own cost.
_KEEP_ALL = ("random", {"ratio": 1.0})
_DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class MmtokenCounts(TokenCounts):
    """lmms-eval's per-sample token counts plus mmtoken's stats of the sample's prefill, logged with the sample."""

    mmtoken: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {**super().to_dict(), "mmtoken": self.mmtoken}


def method_params(params: dict[str, object]) -> dict[str, object]:
    """Method parameters from lmms-eval's `k=v` model arguments: `[1,2,4]` (or `1;2;4`) becomes a tuple."""
    parsed = {}
    for name, value in params.items():
        if isinstance(value, str) and (value.startswith("[") or ";" in value):
            value = tuple(json.loads(value) if value.startswith("[") else (int(part) for part in value.split(";")))
        parsed[name] = value
    return parsed


def load_pretrained(
    pretrained: str, device: str, dtype: str = "auto", attn_implementation: str | None = None
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """A model and processor by embedded zoo name (`probe-llava`), local folder or hub id, left-padding."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    source = embedded.path(pretrained) if pretrained in embedded.NAMES else pretrained
    extra = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    model = AutoModelForImageTextToText.from_pretrained(source, dtype=_DTYPES[dtype], **extra).to(device).eval()
    processor = AutoProcessor.from_pretrained(source)
    processor.tokenizer.padding_side = "left"
    return model, processor


# A sweep builds one MmtokenModel per cell (lmms-eval drops the model when a cell ends): the latest model loaded is
# kept and reused, patched anew each time (`clean()` unpatches it).
_latest_loaded = lru_cache(maxsize=1)(load_pretrained)


def read_video(path: str, max_frames: int) -> tuple[np.ndarray, VideoMetadata]:
    """The frames (at most `max_frames`, evenly spaced, first and last included) and metadata of a video file."""

    def evenly(metadata: VideoMetadata, **_: object) -> list[int]:
        total = metadata.total_num_frames
        count = min(total, max_frames)
        return [round(index * (total - 1) / max(count - 1, 1)) for index in range(count)]

    return load_video(path, backend="pyav", sample_indices_fn=evenly)


class MmtokenModel(lmms):
    """Any VLM mmtoken supports, loaded with `AutoModelForImageTextToText` / `AutoProcessor` and patched with a
    method: `method=<name>` plus its parameters, or none for the unpatched model. An embedded probe model gets
    its `METHOD_DEFAULTS` (the papers' layers scaled to its depth) unless the parameters say otherwise, and at a
    `budget` those cannot reach for one of its media, its low-budget shape (`embedded.method_parameters`).

    Images, and videos (files decoded with PyAV, at most `max_num_frames` frames, evenly spaced); batches are
    left-padded. Each sample returns its input and output token counts and mmtoken's stats of its row: visual
    tokens per layer, FLOPs ratios by both formulas, and the batch's prefill milliseconds and KV bytes."""

    is_simple = False

    def __init__(
        self,
        pretrained: str,
        method: str = UNPATCHED,
        device: str | None = None,
        dtype: str = "auto",
        attn_implementation: str | None = None,
        batch_size: int | str = 1,
        max_num_frames: int = 32,
        max_new_tokens: int = 128,
        **params: object,
    ) -> None:
        super().__init__()
        defaults = embedded.METHOD_DEFAULTS.get(pretrained, {}).get(method, {})
        self.method, self.params = method, {**defaults, **method_params(params)}
        name, patch_params = _KEEP_ALL if method == UNPATCHED else (method, self.params)
        build(name, **patch_params)  # a bad method or parameter is refused before the model loads
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
        if self.accelerator.num_processes > 1:  # each process its own GPU, or all on the CPU
            device = f"cuda:{self.accelerator.local_process_index}" if torch.cuda.is_available() else "cpu"
            self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model, self.processor = _latest_loaded(pretrained, device, dtype, attn_implementation)
        if method != UNPATCHED and "budget" in self.params and pretrained in embedded.LOW_BUDGET_DEFAULTS:
            shaped = self._budget_shape(pretrained, method, self.params["budget"])
            self.params = patch_params = {**shaped, **method_params(params)}
        self.batch_size, self.max_num_frames, self.max_new_tokens = int(batch_size), max_num_frames, max_new_tokens
        self.handle = mmtoken.patch(self.model, name, timing=True, **patch_params)

    def _budget_shape(self, pretrained: str, method: str, budget: float) -> dict[str, object]:
        """The probe model's parameters for `method` at `budget`: its low-budget shape where its defaults cannot
        reach the budget for one of the media it takes (images, and videos), else its defaults."""
        depth = self.model.config.text_config.num_hidden_layers
        model_format = probe_format(self.model, self.processor)
        defaults = embedded.METHOD_DEFAULTS.get(pretrained, {}).get(method, {})
        shapes = [embedded.method_parameters(pretrained, method, budget, depth, model_format.visual_tokens(kind))
                  for kind in model_format.kinds]  # fmt: skip
        return next((shape for shape in shapes if shape != defaults), defaults)

    @property
    def device(self) -> torch.device:
        """Where the model runs (lmms-eval's data-parallel evaluation puts its counts there)."""
        return self.model.device

    def clean(self) -> None:
        mmtoken.unpatch(self.model)
        super().clean()

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError("the mmtoken model answers generate_until tasks only")

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("the mmtoken model answers generate_until tasks only")

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        # requests of a chat task: (context, doc_to_messages, generation kwargs, doc id, task, split)
        collator = utils.Collator([request.args for request in requests], lambda args: (args[3], args[3]),
                                  group_fn=lambda args: args[2], grouping=True)  # fmt: skip
        results = []
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="mmtoken responding")
        for chunk in collator.get_batched(n=self.batch_size, batch_fn=None):
            _, to_messages, generation, doc_ids, tasks, splits = zip(*chunk, strict=True)
            docs = [self.task_dict[task][split][doc] for task, split, doc in zip(tasks, splits, doc_ids, strict=True)]
            conversations = [ChatMessages(messages=to_messages[0](doc)) for doc in docs]
            results += self._generate(conversations, generation[0])
            progress.update(len(chunk))
        progress.close()
        return collator.get_original(results)

    @torch.no_grad()
    def _generate(self, conversations: list[ChatMessages], generation: dict) -> list[GenerationResult]:
        inputs = self._inputs(conversations)
        sampling = bool(generation.get("do_sample")) or float(generation.get("temperature") or 0) > 0
        options = {"temperature": generation.get("temperature"), "top_p": generation.get("top_p")} if sampling else {}
        started = time.perf_counter()
        out = self.model.generate(
            **inputs,
            max_new_tokens=generation.get("max_new_tokens", self.max_new_tokens),
            do_sample=sampling,
            num_beams=generation.get("num_beams", 1),
            pad_token_id=self.processor.tokenizer.pad_token_id,
            **options,
        )
        seconds = time.perf_counter() - started
        new = out[:, inputs["input_ids"].shape[1] :]
        texts = self.processor.batch_decode(new, skip_special_tokens=True)
        stats = self.handle.stats
        results = []
        for row, text in enumerate(texts):
            for stop in generation.get("until") or []:
                text = text.split(stop)[0]
            per_row = stats.rows[row]
            logged = {
                "method": self.method,
                **({} if self.method == UNPATCHED else self.params),
                "visual_tokens_per_layer": per_row.visual_tokens_per_layer,
                "avg_visual_tokens": per_row.avg_visual_tokens,
                "original_visual_tokens": per_row.original_visual_tokens,
                "flops_ratio_paper": per_row.flops_ratio_paper,
                "flops_ratio_exact": per_row.flops_ratio_exact,
                "prefill_ms": 1000 * stats.prefill_seconds,
                "generate_ms": 1000 * seconds,
                "kv_bytes": stats.kv_bytes,
                "batch_size": len(texts),
            }
            counts = MmtokenCounts(
                input_tokens=int(inputs["attention_mask"][row].sum()),
                output_tokens=int((new[row] != self.processor.tokenizer.pad_token_id).sum()),
                mmtoken=logged,
            )
            results.append(GenerationResult(text=text.strip(), token_counts=counts))
        return results

    def _inputs(self, conversations: list[ChatMessages]) -> dict:
        prompts, images, videos, metadata = [], [], [], []
        for conversation in conversations:
            prompts.append(
                self.processor.apply_chat_template(
                    conversation.to_hf_messages(), add_generation_prompt=True, tokenize=False
                )
            )
            found_images, found_videos, _ = conversation.extract_media()
            images += [Image.open(image).convert("RGB") if isinstance(image, str) else image for image in found_images]
            for video in found_videos:
                frames, meta = read_video(video, self.max_num_frames) if isinstance(video, str) else (video, None)
                videos.append(frames)
                metadata.append(meta)
        media = {"images": images} if images else {}
        if videos:
            media |= {"videos": videos, "video_metadata": metadata, "do_sample_frames": False}
        inputs = self.processor(text=prompts, padding=True, return_tensors="pt", **media)
        return inputs.to(self.model.device, dtype=self.model.dtype)
