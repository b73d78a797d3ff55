"""Tiny random-weight vision-language models built fully offline.

Each family uses the real transformers model, image/video processor and processor classes, configured
like the public checkpoints (LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL) but at toy size:
6 text decoder layers of width 64 with grouped-query attention and a word-level vocabulary of a few dozen
words. The tokenizer is built with the ``tokenizers`` library, so nothing is downloaded.

Visual tokens per image produced by :func:`tiny_inputs` (row 0, row 1):

* ``llava``: 64, 64 (8x8 CLIP grid, CLS dropped).
* ``llava_next``: 268, 208 (anyres base 8x8 + unpadded high-res grid + ``image_newline`` rows).
* ``llava_onevision``: 268, 208 images; 65 per 4-frame video (4 x 4x4 pooled + 1 ``image_newline``).
* ``qwen2_vl`` / ``qwen2_5_vl``: 16, 24 images (2x2 merge of 8x8 / 8x12 patches); 32 per 4-frame video.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image, ImageDraw
from transformers import (
    AutoModelForImageTextToText,
    BatchFeature,
    CLIPImageProcessor,
    LlavaConfig,
    LlavaNextConfig,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
    LlavaProcessor,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)

from mmtoken.zoo.text import LLAVA_TEMPLATE, chatml_template, llama_tokenizer, qwen_tokenizer

FAMILIES: tuple[str, ...] = ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl")
VIDEO_FAMILIES: frozenset[str] = frozenset({"llava_onevision", "qwen2_vl", "qwen2_5_vl"})

NUM_FRAMES = 4
_VIT_IMAGE_SIZE = 56
_VIT_PATCH_SIZE = 7
_ANYRES_PINPOINTS = [[56, 56], [56, 112], [112, 56], [112, 112]]
_ONEVISION_PINPOINTS = [[56 * i, 56 * j] for i in (1, 2, 3) for j in (1, 2, 3)]
_QWEN_PIXELS = {"shortest_edge": 112 * 112, "longest_edge": 28 * 28 * 64}

_VOCABULARY = (
    "what color is the box shape of this image video picture frame where in on at a an and or it its "
    "left right top bottom middle side corner how many are there do you see which one two three four "
    "red green blue yellow white black big small square circle moving describe answer yes no "
    "USER ASSISTANT system user assistant You helpful : . , ?"
)
_QUESTION = "what color is the box and where is it in the picture on the left or right side of the frame"

_COLORS = ((220, 40, 40), (40, 160, 60), (40, 80, 220), (230, 200, 40))
_IMAGE_SIZES: dict[str, tuple[tuple[int, int], ...]] = {
    "llava": ((112, 112), (96, 128)),
    "llava_next": ((112, 80), (56, 112)),
    "llava_onevision": ((112, 80), (56, 112)),
    "qwen2_vl": ((112, 112), (168, 112)),
    "qwen2_5_vl": ((112, 112), (168, 112)),
}
_VIDEO_FRAME_SIZE: dict[str, tuple[int, int]] = {
    "llava_onevision": (56, 56),
    "qwen2_vl": (112, 112),
    "qwen2_5_vl": (112, 112),
}


def _llama_tokenizer() -> PreTrainedTokenizerFast:
    return llama_tokenizer(_VOCABULARY.split())


def _qwen_tokenizer(image_token: str, video_token: str, extra: Sequence[str] = ()) -> PreTrainedTokenizerFast:
    return qwen_tokenizer(_VOCABULARY.split(), image_token, video_token, extra)


def _text_config(tokenizer: PreTrainedTokenizerFast, **overrides: object) -> dict[str, object]:
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 6,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        **overrides,
    }


def _vit_config(model_type: str, **overrides: object) -> dict[str, object]:
    return {
        "model_type": model_type,
        "image_size": _VIT_IMAGE_SIZE,
        "patch_size": _VIT_PATCH_SIZE,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        **overrides,
    }


def _mrope_text_config(tokenizer: PreTrainedTokenizerFast) -> dict[str, object]:
    rope = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1_000_000.0}
    return _text_config(tokenizer, rope_parameters=rope)


def _build_llava() -> tuple[PreTrainedConfig, ProcessorMixin]:
    tokenizer = _llama_tokenizer()
    config = LlavaConfig(
        text_config=_text_config(tokenizer, model_type="llama"),
        vision_config=_vit_config("clip_vision_model", projection_dim=32),
        image_token_index=tokenizer.image_token_id,
        image_seq_length=(_VIT_IMAGE_SIZE // _VIT_PATCH_SIZE) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": _VIT_IMAGE_SIZE},
        crop_size={"height": _VIT_IMAGE_SIZE, "width": _VIT_IMAGE_SIZE},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=_VIT_PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_TEMPLATE,
    )
    return config, processor


def _build_llava_next() -> tuple[PreTrainedConfig, ProcessorMixin]:
    tokenizer = _llama_tokenizer()
    config = LlavaNextConfig(
        text_config=_text_config(tokenizer, model_type="llama"),
        vision_config=_vit_config("clip_vision_model", projection_dim=32),
        image_token_index=tokenizer.image_token_id,
        image_seq_length=(_VIT_IMAGE_SIZE // _VIT_PATCH_SIZE) ** 2,
        image_grid_pinpoints=_ANYRES_PINPOINTS,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": _VIT_IMAGE_SIZE},
        crop_size={"height": _VIT_IMAGE_SIZE, "width": _VIT_IMAGE_SIZE},
        image_grid_pinpoints=_ANYRES_PINPOINTS,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=_VIT_PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_TEMPLATE,
    )
    return config, processor


def _build_llava_onevision() -> tuple[PreTrainedConfig, ProcessorMixin]:
    tokenizer = _qwen_tokenizer("<image>", "<video>")
    config = LlavaOnevisionConfig(
        text_config=_text_config(tokenizer, model_type="qwen2"),
        vision_config=_vit_config("siglip_vision_model", vision_use_head=False),
        image_token_index=tokenizer.image_token_id,
        video_token_index=tokenizer.video_token_id,
        image_grid_pinpoints=_ONEVISION_PINPOINTS,
        vision_aspect_ratio="anyres_max_9",
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
    )
    size = {"height": _VIT_IMAGE_SIZE, "width": _VIT_IMAGE_SIZE}
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=_ONEVISION_PINPOINTS),
        tokenizer=tokenizer,
        video_processor=LlavaOnevisionVideoProcessor(size=size),
        num_image_tokens=(_VIT_IMAGE_SIZE // _VIT_PATCH_SIZE) ** 2,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        chat_template=chatml_template("<image>", "<video>"),
    )
    return config, processor


def _qwen_parts(processor_class: type[ProcessorMixin]) -> tuple[PreTrainedTokenizerFast, ProcessorMixin]:
    tokenizer = _qwen_tokenizer("<|image_pad|>", "<|video_pad|>", extra=("<|vision_start|>", "<|vision_end|>"))
    patches = {"patch_size": 14, "temporal_patch_size": 2, "merge_size": 2}
    processor = processor_class(
        image_processor=Qwen2VLImageProcessor(size=_QWEN_PIXELS, **patches),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(size=_QWEN_PIXELS, cap_pixels_per_frame=True, **patches),
        chat_template=chatml_template(
            "<|vision_start|><|image_pad|><|vision_end|>", "<|vision_start|><|video_pad|><|vision_end|>"
        ),
    )
    return tokenizer, processor


def _qwen_token_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    return {
        "image_token_id": tokenizer.image_token_id,
        "video_token_id": tokenizer.video_token_id,
        "vision_start_token_id": tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        "vision_end_token_id": tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    }


def _build_qwen2_vl() -> tuple[PreTrainedConfig, ProcessorMixin]:
    tokenizer, processor = _qwen_parts(Qwen2VLProcessor)
    vision = {
        "depth": 3,
        "embed_dim": 32,
        "hidden_size": 64,
        "mlp_ratio": 2,
        "num_heads": 4,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    config = Qwen2VLConfig(
        text_config=_mrope_text_config(tokenizer), vision_config=vision, **_qwen_token_ids(tokenizer)
    )
    return config, processor


def _build_qwen2_5_vl() -> tuple[PreTrainedConfig, ProcessorMixin]:
    tokenizer, processor = _qwen_parts(Qwen2_5_VLProcessor)
    vision = {
        "depth": 4,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 4,
        "out_hidden_size": 64,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 56,
        "fullatt_block_indexes": [1, 3],
        "tokens_per_second": 2,
    }
    config = Qwen2_5_VLConfig(
        text_config=_mrope_text_config(tokenizer), vision_config=vision, **_qwen_token_ids(tokenizer)
    )
    return config, processor


_BUILDERS: dict[str, Callable[[], tuple[PreTrainedConfig, ProcessorMixin]]] = {
    "llava": _build_llava,
    "llava_next": _build_llava_next,
    "llava_onevision": _build_llava_onevision,
    "qwen2_vl": _build_qwen2_vl,
    "qwen2_5_vl": _build_qwen2_5_vl,
}


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"Unknown family {family!r}; supported families: {', '.join(FAMILIES)}")


def tiny_model(family: str, attn_implementation: str = "sdpa", seed: int = 0) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Build a float32 eval-mode tiny model of ``family`` with weights drawn from ``seed``, and its processor.

    ``attn_implementation`` is applied to the text model only; the vision tower runs eager when it is
    ``"eager"`` and sdpa otherwise, so a custom registered attention function sees decoder layers only.
    """
    _check_family(family)
    config, processor = _BUILDERS[family]()
    tower = "eager" if attn_implementation == "eager" else "sdpa"
    implementation = {"": tower, "text_config": attn_implementation, "vision_config": tower}
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, attn_implementation=implementation, dtype=torch.float32)
    return model.eval(), processor


def _draw(size: tuple[int, int], index: int, step: int = 0) -> Image.Image:
    width, height = size
    image = Image.new("RGB", size, _COLORS[(index + 2) % len(_COLORS)])
    box_w, box_h = width // 3, height // 3
    left = (width // 8 + step * width // 8 + index * width // 4) % (width - box_w)
    top = (height // 8 + index * height // 5) % (height - box_h)
    ImageDraw.Draw(image).rectangle((left, top, left + box_w, top + box_h), fill=_COLORS[index % len(_COLORS)])
    return image


def _question(length: int) -> str:
    words = _QUESTION.split()
    return " ".join(words[i % len(words)] for i in range(length))


def tiny_inputs(
    processor: ProcessorMixin,
    family: str,
    batch: int = 1,
    video: bool = False,
    question_lengths: Sequence[int] | None = None,
    rows: Sequence[int] | None = None,
) -> BatchFeature:
    """Deterministic synthetic images (or 4-frame videos) and questions, processed with left padding.

    Row ``i`` gets a question of ``question_lengths[i]`` words (default ``5 + 3 * i``) and its own image
    size (cycled per family), so a batch has both padding and, for anyres and Qwen families, ragged
    visual-token counts. ``rows`` builds only those rows of the default batch (e.g. ``rows=[1]``: row 1 alone).
    """
    _check_family(family)
    if video and family not in VIDEO_FAMILIES:
        raise ValueError(f"Family {family!r} has no video input; video families: {', '.join(sorted(VIDEO_FAMILIES))}")
    rows = list(rows) if rows is not None else list(range(batch))
    lengths = list(question_lengths) if question_lengths is not None else [5 + 3 * row for row in rows]
    if len(lengths) != len(rows):
        raise ValueError(f"question_lengths has {len(lengths)} entries for a batch of {len(rows)}")
    kind = "video" if video else "image"
    prompts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": _question(length)}]}],
            add_generation_prompt=True,
            tokenize=False,
        )
        for length in lengths
    ]
    if video:
        frames = _VIDEO_FRAME_SIZE[family]
        media = {"videos": [[_draw(frames, row, step) for step in range(NUM_FRAMES)] for row in rows]}
    else:
        sizes = _IMAGE_SIZES[family]
        media = {"images": [[_draw(sizes[row % len(sizes)], row)] for row in rows]}
    return processor(text=prompts, padding=True, return_tensors="pt", **media)
