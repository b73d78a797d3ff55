"""A request's media split across encoders: the parts' encodings joined equal the whole's, and the prefill fed the
joined encoding gives the whole's logits, for images on every family and videos on the video families."""

from __future__ import annotations

import pytest
import torch
from conftest import PRUNING, model_and_processor

import mmtoken
from mmtoken.encoding import encode, feeding
from mmtoken.staging.batching import collate, collate_encoded
from mmtoken.staging.decoding import prefill
from mmtoken.staging.splitting import joined_parts, media_parts
from mmtoken.zoo.tiny import VIDEO_FAMILIES, _draw

FAMILIES = ["llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl"]


def _prompt(processor, images: int = 0, frames: int = 0) -> dict:
    content = [{"type": "image"}] * images + ([{"type": "video"}] if frames else [])
    messages = [{"role": "user", "content": [*content, {"type": "text", "text": "what is here"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    media = {"images": [_draw((64 + 8 * index, 64), index) for index in range(images)]} if images else {}
    if frames:
        media["videos"] = [[_draw((64, 64), 0, step) for step in range(frames)]]
    return processor(text=[text], return_tensors="pt", **media)


def _cases() -> list:
    images = [pytest.param(family, 3, 0, id=f"{family}-3-images") for family in FAMILIES]
    videos = [pytest.param(family, 0, 8, id=f"{family}-8-frames") for family in FAMILIES if family in VIDEO_FAMILIES]
    return images + videos


@pytest.mark.parametrize(("family", "images", "frames"), _cases())
@pytest.mark.parametrize("parts", [2, 3])
@torch.no_grad()
def test_parts_encoded_apart_and_joined_are_the_whole(family, images, frames, parts):
    model, processor = model_and_processor(family)
    inputs = _prompt(processor, images, frames)
    pieces = media_parts(inputs, parts)
    assert len(pieces) == parts
    newline = getattr(model.model, "image_newline", None)
    joined = joined_parts([encode(model, piece) for piece in pieces], newline)
    whole = encode(model, inputs)
    for kind, output in whole.features.items():
        expected, got = output.pooler_output, joined.features[kind].pooler_output
        expected = list(expected) if isinstance(expected, (list, tuple)) else [expected]
        got = list(got) if isinstance(got, (list, tuple)) else [got]
        assert len(got) == len(expected)
        for a, b in zip(got, expected, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with feeding(model, joined):
        fed = model(**inputs).logits
    torch.testing.assert_close(fed, model(**inputs).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("family", "images", "frames"), _cases())
@pytest.mark.parametrize("parts", [2, 3])
@torch.no_grad()
def test_vision_signals_of_parts_joined_are_the_whole(family, images, frames, parts):
    """VisionZip's and HoliTom's signal (the tower's attention) of each part joined: the whole's, and their prefill
    fed the joined encoding gives the whole's logits."""
    model, processor = model_and_processor(family)
    inputs = _prompt(processor, images, frames)
    newline = getattr(model.model, "image_newline", None)
    for method in ("visionzip", "holitom") if frames else ("visionzip",):
        with mmtoken.patched(model, method, **PRUNING[method]):
            whole = encode(model, inputs, signal=True)
            joined = joined_parts([encode(model, piece, signal=True) for piece in media_parts(inputs, parts)],
                                  newline)  # fmt: skip
            signalled = {kind: signals for kind, signals in whole.signals.items() if signals}
            assert signalled and signalled.keys() == joined.signals.keys()
            for kind, signals in signalled.items():
                torch.testing.assert_close(torch.cat(joined.signals[kind]), torch.cat(signals), rtol=1e-5, atol=1e-6)
            with feeding(model, whole):
                expected = model(**inputs).logits
            with feeding(model, joined):
                torch.testing.assert_close(model(**inputs).logits, expected, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_a_request_encoded_whole_and_one_joined_from_parts_batch_together_with_every_signal():
    """A one-image prompt (one part, whatever the encoders) beside a two-image one split in two: their VisionZip
    prefill batched, in either order, gives each its first token alone."""
    model, processor = model_and_processor("llava")
    one, two = _prompt(processor, images=1), _prompt(processor, images=2)
    with mmtoken.patched(model, "visionzip", **PRUNING["visionzip"]):
        encodings = [encode(model, one, signal=True),
                     joined_parts([encode(model, piece, signal=True) for piece in media_parts(two, 2)])]  # fmt: skip
        prompts = (one, two)
        alone = [prefill(model, prompt, encoded).tokens.item()
                 for prompt, encoded in zip(prompts, encodings, strict=True)]  # fmt: skip
        for order in ([0, 1], [1, 0]):
            batch = collate([prompts[row] for row in order], processor.tokenizer.pad_token_id)
            together = collate_encoded([encodings[row] for row in order])
            assert [len(signals) for signals in together.signals.values() if signals] == [3]
            assert prefill(model, batch, together).tokens.tolist() == [alone[row] for row in order]


def test_parts_with_and_without_the_signal_are_refused():
    model, processor = model_and_processor("llava")
    pieces = media_parts(_prompt(processor, images=2), 2)
    with pytest.raises(ValueError, match="some parts carry the vision signal and others do not"):
        joined_parts([encode(model, pieces[0], signal=True), encode(model, pieces[1])])


def test_what_cannot_be_split_stays_whole():
    _, processor = model_and_processor("qwen2_5_vl")
    assert len(media_parts(_prompt(processor, images=1), 4)) == 1  # one image
    assert len(media_parts(_prompt(processor, images=2, frames=4), 4)) == 1  # images and a video
    assert len(media_parts(_prompt(processor, images=2), 1)) == 1
