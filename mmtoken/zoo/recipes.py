"""The probe models' architectures, built from scratch with random weights before training, and the world each
is trained on.

`probe-llava` is LLaVA-1.5's format at LLaVA-1.5's geometry (a CLIP tower at 336 px with 14-px patches, so 576
visual tokens and the papers' 192 / 128 / 64 budgets mean what they mean there), shrunk in width and depth.
`probe-qwen2vl` is Qwen2-VL's format (14-px patches in pairs of frames, 2 x 2 merge, M-RoPE) at the same width
and depth: a 336-px probe image becomes 144 visual tokens, an 8-frame 224-px probe video 256. Both read probe
world v1 (:mod:`mmtoken.zoo.probe`) with a 6-layer language model.

The `-v2` recipes read probe world v2 (:mod:`mmtoken.zoo.world`) with a language model of 24 narrow layers, deep
enough for the papers' layer schedules (FastV's cut at layer 2, PyramidDrop's four stages, FEATHER's late
re-selection), and a deeper tower that is pretrained contrastively before the question answering
(:mod:`mmtoken.zoo.pretrain`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from types import ModuleType

import torch
from transformers import (
    AutoModelForImageTextToText,
    CLIPImageProcessor,
    LlavaConfig,
    LlavaProcessor,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2VLConfig,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)

from mmtoken.zoo import probe, world
from mmtoken.zoo.probe import VIDEO_SIZE
from mmtoken.zoo.text import LLAVA_TEMPLATE, chatml_template, llama_tokenizer, qwen_tokenizer

IMAGE_SIZE, PATCH_SIZE = 336, 14
HEADS = 4


@dataclass(frozen=True)
class Geometry:
    """Widths and depths of a probe model's vision tower and language model, and the world it reads."""

    tower_width: int
    tower_depth: int
    width: int
    depth: int
    world: ModuleType
    scaled_residuals: bool = False  # start the language model's residual outputs small (`_scale_residual_outputs`)


V1 = Geometry(tower_width=256, tower_depth=6, width=256, depth=6, world=probe)
V2 = Geometry(tower_width=256, tower_depth=8, width=128, depth=24, world=world, scaled_residuals=True)


def _scale_residual_outputs(model: PreTrainedModel, geometry: Geometry) -> PreTrainedModel:
    """GPT-2's initialisation (Radford et al. 2019): each of the language model's 2 x depth residual branches
    (attention output and MLP down projection) starts scaled by 1 / sqrt(2 x depth), so a deep model's residual
    stream does not grow with its depth at the start."""
    if geometry.scaled_residuals:
        with torch.no_grad():
            for layer in model.model.language_model.layers:
                for weight in (layer.self_attn.o_proj.weight, layer.mlp.down_proj.weight):
                    weight.mul_((2 * geometry.depth) ** -0.5)
    return model


def _language_model(tokenizer: PreTrainedTokenizerFast, geometry: Geometry, **extra: object) -> dict[str, object]:
    """A probe language model: the geometry's width and depth, 4 heads, the tokenizer's special ids."""
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": geometry.width,
        "intermediate_size": 4 * geometry.width,
        "num_hidden_layers": geometry.depth,
        "num_attention_heads": HEADS,
        "num_key_value_heads": HEADS,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        **extra,
    }


def probe_llava(geometry: Geometry = V1) -> tuple[PreTrainedModel, ProcessorMixin]:
    """A fresh (untrained) probe-llava: CLIP ViT, projector and Llama of the geometry (v1: 6 layers, 256 wide)."""
    tokenizer = llama_tokenizer(geometry.world.VOCABULARY)
    config = LlavaConfig(
        text_config=_language_model(tokenizer, geometry, model_type="llama", max_position_embeddings=1024),
        vision_config={
            "model_type": "clip_vision_model",
            "image_size": IMAGE_SIZE,
            "patch_size": PATCH_SIZE,
            "hidden_size": geometry.tower_width,
            "intermediate_size": 4 * geometry.tower_width,
            "num_hidden_layers": geometry.tower_depth,
            "num_attention_heads": HEADS,
            "projection_dim": geometry.tower_width,
        },
        image_token_index=tokenizer.image_token_id,
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
        ),
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_TEMPLATE,
    )
    return _scale_residual_outputs(AutoModelForImageTextToText.from_config(config), geometry), processor


def probe_qwen2vl(geometry: Geometry = V1) -> tuple[PreTrainedModel, ProcessorMixin]:
    """A fresh (untrained) probe-qwen2vl: Qwen2-VL ViT and merger and Qwen2 of the geometry (v1: 6 layers, 256
    wide)."""
    vision_marks = ("<|vision_start|>", "<|vision_end|>")
    tokenizer = qwen_tokenizer(geometry.world.VOCABULARY, "<|image_pad|>", "<|video_pad|>", extra=vision_marks)
    head_dim = geometry.width // HEADS
    config = Qwen2VLConfig(
        text_config=_language_model(
            tokenizer,
            geometry,
            max_position_embeddings=2048,
            # Qwen2-VL's split of the rotary frequencies between time, height and width (16/24/24 of 64)
            rope_parameters={
                "rope_type": "default",
                "mrope_section": [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16],
                "rope_theta": 1_000_000.0,
            },
        ),
        vision_config={
            "depth": geometry.tower_depth,
            "embed_dim": geometry.tower_width,
            "hidden_size": geometry.width,  # the merger's output: the language model's width
            "mlp_ratio": 4,
            "num_heads": HEADS,
            "patch_size": PATCH_SIZE,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=tokenizer.image_token_id,
        video_token_id=tokenizer.video_token_id,
        vision_start_token_id=tokenizer.convert_tokens_to_ids(vision_marks[0]),
        vision_end_token_id=tokenizer.convert_tokens_to_ids(vision_marks[1]),
    )
    # the probe's sizes (224 and 336 px) are multiples of 28, so these bounds leave them unresized
    pixels = {"shortest_edge": VIDEO_SIZE * VIDEO_SIZE, "longest_edge": IMAGE_SIZE * IMAGE_SIZE}
    patches = {"patch_size": PATCH_SIZE, "temporal_patch_size": 2, "merge_size": 2}
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=pixels, **patches),
        video_processor=Qwen2VLVideoProcessor(size=pixels, cap_pixels_per_frame=True, **patches),
        tokenizer=tokenizer,
        chat_template=chatml_template(
            "<|vision_start|><|image_pad|><|vision_end|>", "<|vision_start|><|video_pad|><|vision_end|>"
        ),
    )
    return _scale_residual_outputs(AutoModelForImageTextToText.from_config(config), geometry), processor


RECIPES: dict[str, Callable[[], tuple[PreTrainedModel, ProcessorMixin]]] = {
    "probe-llava": probe_llava,
    "probe-qwen2vl": probe_qwen2vl,
    "probe-llava-v2": partial(probe_llava, V2),
    "probe-qwen2vl-v2": partial(probe_qwen2vl, V2),
}
WORLDS: dict[str, ModuleType] = {"probe-llava": probe, "probe-qwen2vl": probe, "probe-llava-v2": world,
                                 "probe-qwen2vl-v2": world}  # fmt: skip
