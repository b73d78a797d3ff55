"""A request's media in parts, so that several encoders share one request: the images of a multi-image prompt, or
the frames of a video, split in order (`media_parts`), each part encoded on its own, and the parts' encodings
joined into what the whole would have given (`joined_parts`). Video frames split only where the vision tower
encodes each frame (or Qwen's pair of frames) apart, which holds for every supported family."""

from __future__ import annotations

import itertools

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from mmtoken.encoding import Encoded
from mmtoken.state import IMAGE, VIDEO

_IMAGE_ROWS = ("pixel_values", "image_sizes", "batch_num_images")


def _runs(count: int, parts: int) -> list[range]:
    """`count` items in at most `parts` runs of nearly equal length, in order."""
    parts = max(1, min(parts, count))
    bounds = [round(index * count / parts) for index in range(parts + 1)]
    return [range(start, end) for start, end in itertools.pairwise(bounds) if end > start]


def media_parts(inputs: dict, parts: int) -> list[dict]:
    """The media inputs of one request (the processor's output, one prompt) in at most `parts` parts: the images
    apart, or the video's frames in runs (Qwen's temporal steps of two frames); the whole as one part where it holds
    images and a video, one item, or OneVision images that the model patches by how many a prompt holds."""
    media = {name: value for name, value in inputs.items() if name not in ("input_ids", "attention_mask",
                                                                          "mm_token_type_ids")}  # fmt: skip
    images, video = media.get("pixel_values") is not None, media.get("pixel_values_videos") is not None
    if images == video or parts <= 1:
        return [media]
    if video:
        return _video_parts(media, parts)
    if "image_grid_thw" in media:  # Qwen: the images' patches in one list, each image its grid's product
        grid = media["image_grid_thw"]
        ends = torch.cumsum(grid.prod(1), 0).tolist()
        starts = [0, *ends[:-1]]
        return [{**media, "pixel_values": media["pixel_values"][starts[run[0]] : ends[run[-1]]],
                 "image_grid_thw": grid[run.start : run.stop]} for run in _runs(len(grid), parts)]  # fmt: skip
    count = len(media["pixel_values"])
    if "batch_num_images" in media and bool((media["batch_num_images"] != 1).any()):
        return [media]
    return [{**media, **{name: media[name][run.start : run.stop] for name in _IMAGE_ROWS if name in media}}
            for run in _runs(count, parts)]  # fmt: skip


def _video_parts(media: dict, parts: int) -> list[dict]:
    if "video_grid_thw" in media:  # Qwen: (steps x rows x columns) patches, each step two frames
        steps, rows, columns = media["video_grid_thw"][0].tolist()
        per_step = rows * columns
        pixels, grid = media["pixel_values_videos"], media["video_grid_thw"]
        return [{**media, "pixel_values_videos": pixels[run.start * per_step : run.stop * per_step],
                 "video_grid_thw": grid.new_tensor([[len(run), rows, columns]])}
                for run in _runs(steps, parts)]  # fmt: skip
    frames = media["pixel_values_videos"]  # (1, frames, channels, height, width)
    return [{**media, "pixel_values_videos": frames[:, run.start : run.stop]} for run in _runs(frames.shape[1], parts)]


def joined_parts(encodings: list[Encoded], newline: torch.Tensor | None = None) -> Encoded:
    """The encoding of the whole request from its parts' encodings, in order, their vision signals too where every
    part was encoded with it. `newline` is the model's image newline (LLaVA-OneVision), which newer releases append
    to each video's features: a split video gets it once, at its end, in its features as in its signal."""
    signalled = {bool(encoded.signals.get(IMAGE) or encoded.signals.get(VIDEO)) for encoded in encodings}
    if len(signalled) > 1:
        raise ValueError("joining parts: some parts carry the vision signal and others do not; encode every part "
                         "with it or none")  # fmt: skip
    if len(encodings) == 1:
        return encodings[0]
    kinds = list(encodings[0].features)
    features, signals = {}, {}
    for kind in kinds:
        signals[kind] = [signal for encoded in encodings for signal in encoded.signals.get(kind, [])]
        outputs = [encoded.features[kind].pooler_output for encoded in encodings]
        if kind == IMAGE:
            joined = type(outputs[0])(item for output in outputs for item in output)
        elif isinstance(outputs[0], (list, tuple)):  # Qwen: one tensor per video
            joined = type(outputs[0])([torch.cat([output[0] for output in outputs])])
        else:  # OneVision: (1, tokens, dim) per video
            ends = newline is not None and all(
                torch.equal(output[0, -1], newline.to(output.dtype)) for output in outputs
            )
            body = [output[:, :-1] if ends else output for output in outputs]
            joined = torch.cat(body + ([outputs[-1][:, -1:]] if ends else []), dim=1)
            if signals[kind]:  # every part's signal ends with its newline's entry, whatever the release
                signals[kind] = [*(signal[:-1] for signal in signals[kind][:-1]), signals[kind][-1]]
        features[kind] = BaseModelOutputWithPooling(pooler_output=joined)
    return Encoded(features, {kind: signal for kind, signal in signals.items() if signal})
