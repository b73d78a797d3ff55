"""The probe models' architectures, built from scratch with random weights before training.

`probe-llava` is LLaVA-1.5's format at LLaVA-1.5's geometry (a CLIP tower at 336 px with 14-px patches, so 576
visual tokens and the papers' 192 / 128 / 64 budgets mean what they mean there), shrunk in width and depth.
"""

from __future__ import annotations

from transformers import (
    AutoModelForImageTextToText,
    CLIPImageProcessor,
    LlavaConfig,
    LlavaProcessor,
    PreTrainedModel,
    ProcessorMixin,
)

from mmtoken.zoo.probe import VOCABULARY
from mmtoken.zoo.text import LLAVA_TEMPLATE, llama_tokenizer

IMAGE_SIZE, PATCH_SIZE = 336, 14
WIDTH, DEPTH = 256, 6


def probe_llava() -> tuple[PreTrainedModel, ProcessorMixin]:
    """A fresh (untrained) probe-llava: 6-layer 256-wide CLIP ViT, projector, 6-layer 256-wide Llama."""
    tokenizer = llama_tokenizer(VOCABULARY)
    config = LlavaConfig(
        text_config={
            "model_type": "llama",
            "vocab_size": len(tokenizer),
            "hidden_size": WIDTH,
            "intermediate_size": 4 * WIDTH,
            "num_hidden_layers": DEPTH,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "max_position_embeddings": 1024,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        },
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


RECIPES = {"probe-llava": probe_llava}
