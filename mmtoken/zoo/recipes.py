"""The probe models' architectures, built from scratch with random weights before training.

`probe-llava` is LLaVA-1.5's format at LLaVA-1.5's geometry (a CLIP tower at 336 px with 14-px patches, so 576
visual tokens and the papers' 192 / 128 / 64 budgets mean what they mean there), shrunk in width and depth.
`probe-qwen2vl` is Qwen2-VL's format (14-px patches in pairs of frames, 2 x 2 merge, M-RoPE) at the same width
and depth: a 336-px probe image becomes 144 visual tokens, an 8-frame 224-px probe video 256.
"""

from __future__ import annotations

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

from mmtoken.zoo.probe import VIDEO_SIZE, VOCABULARY
from mmtoken.zoo.text import LLAVA_TEMPLATE, chatml_template, llama_tokenizer, qwen_tokenizer

IMAGE_SIZE, PATCH_SIZE = 336, 14
WIDTH, DEPTH = 256, 6


def _language_model(tokenizer: PreTrainedTokenizerFast, **extra: object) -> dict[str, object]:
    """The language model both probe models share: 6 layers, 256 wide, 4 heads, the tokenizer's special ids."""
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": WIDTH,
        "intermediate_size": 4 * WIDTH,
        "num_hidden_layers": DEPTH,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        **extra,
    }


def probe_llava() -> tuple[PreTrainedModel, ProcessorMixin]:
    """A fresh (untrained) probe-llava: 6-layer 256-wide CLIP ViT, projector, 6-layer 256-wide Llama."""
    tokenizer = llama_tokenizer(VOCABULARY)
    config = LlavaConfig(
        text_config=_language_model(tokenizer, model_type="llama", max_position_embeddings=1024),
        vision_config={
            "model_type": "clip_vision_model",
            "image_size": IMAGE_SIZE,
            "patch_size": PATCH_SIZE,
            "hidden_size": WIDTH,
            "intermediate_size": 4 * WIDTH,
            "num_hidden_layers": DEPTH,
            "num_attention_heads": 4,
            "projection_dim": WIDTH,
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
    return AutoModelForImageTextToText.from_config(config), processor


def probe_qwen2vl() -> tuple[PreTrainedModel, ProcessorMixin]:
    """A fresh (untrained) probe-qwen2vl: 6-layer 256-wide Qwen2-VL ViT and merger, 6-layer 256-wide Qwen2."""
    vision_marks = ("<|vision_start|>", "<|vision_end|>")
    tokenizer = qwen_tokenizer(VOCABULARY, "<|image_pad|>", "<|video_pad|>", extra=vision_marks)
    head_dim = WIDTH // 4
    config = Qwen2VLConfig(
        text_config=_language_model(
            tokenizer,
            max_position_embeddings=2048,
            # Qwen2-VL's split of the rotary frequencies between time, height and width (16/24/24 of 64)
            rope_parameters={
                "rope_type": "default",
                "mrope_section": [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16],
                "rope_theta": 1_000_000.0,
            },
        ),
        vision_config={
            "depth": DEPTH,
            "embed_dim": WIDTH,
            "hidden_size": WIDTH,
            "mlp_ratio": 4,
            "num_heads": 4,
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
    return AutoModelForImageTextToText.from_config(config), processor


RECIPES = {"probe-llava": probe_llava, "probe-qwen2vl": probe_qwen2vl}
