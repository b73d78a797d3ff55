"""Offline tokenizers and chat templates for the zoo's models: word-level vocabularies built with `tokenizers`."""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

LLAVA_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for item in message['content'] if item['type'] == 'image' %}{{ '<image>\n' }}{% endfor %}"
    "{% for item in message['content'] if item['type'] == 'text' %}{{ item['text'] + ' ' }}{% endfor %}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ 'IMAGE_SLOT' }}"
    "{% elif item['type'] == 'video' %}{{ 'VIDEO_SLOT' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_WORDS = ("system", "user", "assistant", "You", "are", "a", "helpful", ".")
LLAVA_WORDS = ("USER", "ASSISTANT", ":")


def chatml_template(image_slot: str, video_slot: str) -> str:
    """Qwen's ChatML template with the given placeholders for an image and a video."""
    return _CHATML_TEMPLATE.replace("IMAGE_SLOT", image_slot).replace("VIDEO_SLOT", video_slot)


def word_tokenizer(
    words: Sequence[str], named: dict[str, str], extra: Sequence[str] = (), prepend_bos: bool = False
) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over `words`, split on whitespace and punctuation; `named` maps attributes
    (`pad_token`, `image_token`...) to special tokens, `extra` adds more special tokens."""
    named = {"unk_token": "<unk>", **named}
    specials = list(dict.fromkeys([*named.values(), *extra]))
    vocab = {token: index for index, token in enumerate(dict.fromkeys([*specials, *words]))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(specials)
    if prepend_bos:
        bos = named["bos_token"]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
        )
    media = {key: named.pop(key) for key in ("image_token", "video_token") if key in named}
    return PreTrainedTokenizerFast(tokenizer_object=backend, padding_side="left", extra_special_tokens=media, **named)


def llama_tokenizer(words: Sequence[str]) -> PreTrainedTokenizerFast:
    """A LLaVA-1.5-style tokenizer: `<s>` prepended, `</s>` to end, `<image>` placeholders."""
    return word_tokenizer(
        [*LLAVA_WORDS, *words],
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "image_token": "<image>"},
        prepend_bos=True,
    )


def qwen_tokenizer(
    words: Sequence[str], image_token: str, video_token: str, extra: Sequence[str] = ()
) -> PreTrainedTokenizerFast:
    """A Qwen-style tokenizer: ChatML specials, `<|im_end|>` to end."""
    return word_tokenizer(
        [*CHATML_WORDS, *words],
        {
            "pad_token": "<|endoftext|>",
            "bos_token": "<|endoftext|>",
            "eos_token": "<|im_end|>",
            "image_token": image_token,
            "video_token": video_token,
        },
        extra=("<|im_start|>", *extra),
    )
