"""The encoder seam: media encoded once, then prefilled from those features, equals the call from pixels, on
every supported transformers release; VisionZip and HoliTom work on features encoded ahead of time."""

from __future__ import annotations

import inspect
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import greedy, inputs, model_and_processor

import mmtoken
from mmtoken.encoding import encode, feeding
from mmtoken.state import IMAGE, VIDEO

CASES = [("llava", False), ("llava_onevision", True), ("qwen2_5_vl", True)]


@pytest.mark.parametrize(("family", "video"), CASES)
def test_a_prefill_fed_encoded_features_equals_the_forward_on_pixels(family, video):
    model, _ = model_and_processor(family)
    batch = inputs(family, video, batch=2)
    with torch.no_grad():
        expected = model(**batch).logits[:, -1]
        with feeding(model, encode(model, batch)):
            assert torch.allclose(model(**batch).logits[:, -1], expected, atol=1e-5)
        # features of other pixels change the answer: the prefill reads the encoded features, not the pixels
        negated = {key: -value if key.startswith("pixel_values") else value for key, value in batch.items()}
        with feeding(model, encode(model, negated)):
            assert not torch.allclose(model(**batch).logits[:, -1], expected, atol=1e-3)


@pytest.mark.parametrize(("family", "video"), CASES)
def test_another_thread_encodes_its_own_media_while_one_feeds(family, video):
    model, _ = model_and_processor(family)
    batch = inputs(family, video, batch=2)
    negated = {key: -value if key.startswith("pixel_values") else value for key, value in batch.items()}
    expected = encode(model, negated).features
    with feeding(model, encode(model, batch)), ThreadPoolExecutor(1) as encoder_thread:
        encoded = encoder_thread.submit(encode, model, negated).result()
    for kind, features in expected.items():
        assert all(torch.equal(a, b) for a, b in zip(_tensors(encoded.features[kind]), _tensors(features), strict=True))


def _tensors(features: object) -> list[torch.Tensor]:
    return [leaf for leaf in torch.utils._pytree.tree_leaves(features) if torch.is_tensor(leaf)]


@pytest.mark.parametrize(("family", "video"), CASES)
@pytest.mark.parametrize(("method", "params"), [("visionzip", {"ratio": 0.3}), ("holitom", {"ratio": 0.3, "layer": 3})])
def test_methods_that_read_the_vision_signal_run_on_features_encoded_ahead(family, video, method, params):
    model, _ = model_and_processor(family)
    batch = inputs(family, video, batch=2)
    encoded = encode(model, batch, signal=True)  # before any patch, as an encode stage would
    with mmtoken.patched(model, method, **params):
        from_pixels = greedy(model, batch)
        with feeding(model, encoded):
            assert torch.equal(greedy(model, batch), from_pixels)


@pytest.mark.parametrize(("family", "video"), CASES)
def test_an_encoding_holds_only_the_features_a_prefill_reads(family, video):
    model, _ = model_and_processor(family)
    batch = inputs(family, video, batch=2)
    kind = VIDEO if video else IMAGE
    with torch.no_grad():
        full = model.model.get_video_features if video else model.model.get_image_features
        pixels = batch["pixel_values_videos" if video else "pixel_values"]
        wanted = set(inspect.signature(full).parameters) - {"pixel_values", "pixel_values_videos"}
        output = full(pixels, **{key: value for key, value in batch.items() if key in wanted}, return_dict=True)
        encoded = encode(model, batch).features[kind]
    assert set(encoded.keys()) == {"pooler_output"}  # the tower's own states stay behind
    assert len(_tensors(output)) > len(_tensors(encoded))
    assert all(
        torch.equal(a, b) for a, b in zip(_tensors(encoded.pooler_output), _tensors(output.pooler_output), strict=True)
    )
