"""What every model-family adapter shares: finding visual tokens in a prompt and laying out their geometry."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from mmtoken.integrations.frames import EncodedFrames
from mmtoken.state import FED, MEDIA, PIXELS, TEXT, VIDEO, CallState


def _encoded(kind: int, inputs: dict) -> object | None:
    """The features of `kind` that `generate` encoded ahead of the call, if any."""
    return (inputs.get("mm_encoder_outputs") or {}).get(MEDIA[kind])


def raster(frames: int, rows: int, columns: int) -> torch.Tensor:
    """(frame, row, column) of a frames x rows x columns grid in raster order."""
    grid = torch.meshgrid(torch.arange(frames), torch.arange(rows), torch.arange(columns), indexing="ij")
    return torch.stack(grid, dim=-1).reshape(-1, 3)


def runs(flags: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of each run of True in a 1-D mask."""
    edges = torch.diff(flags.int(), prepend=flags.new_zeros(1).int(), append=flags.new_zeros(1).int())
    starts, ends = (edges == 1).nonzero().flatten().tolist(), (edges == -1).nonzero().flatten().tolist()
    return list(zip(starts, ends, strict=True))


class Adapter:
    """Knows one model family: its decoder layers, which prompt tokens are visual and where they sit.

    Subclasses list the `model_types` they serve and implement `split_run`: the (frame, row, column) layout of
    each image or video in one run of consecutive visual tokens, read from the run's embeddings (in blocks) or M-RoPE
    positions (so it works whether the model got pixels or `generate` passed pre-encoded features).
    """

    model_types: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config
        self.language_model = model.get_decoder()
        self.decoder_layers = self.language_model.layers

    def split_run(self, kind: int, blocks: list[torch.Tensor], positions: torch.Tensor | None) -> list[torch.Tensor]:
        """Layouts (n_i, 3) of the media items in one run, whose embeddings are `blocks` one after the other (a
        block of a video's frames not yet encoded, `EncodedFrames`, is known to hold frames only); `positions`
        (3, n) are M-RoPE (t, h, w) or None."""
        raise NotImplementedError

    @property
    def pixel_tower(self) -> tuple[nn.Module, tuple[int, ...]] | None:
        """The vision tower, whose forward of pixels (and of Qwen's grid sizes) a CUDA graph can replay, with the
        indices of the hidden states the model reads from it; None where no graph can."""
        return None

    @property
    def segmented_tower(self) -> nn.Module | None:
        """A vision tower whose blocks attend within segments of its packed tokens (Qwen's ViT), None elsewhere."""
        return None

    @property
    def frame_pooling(self) -> nn.Module | None:
        """The module whose `apply_pooling` pools video frames (LLaVA-OneVision), None where frames are not pooled."""
        return None

    @property
    def vision_attention(self) -> nn.Module:
        """The vision-tower attention module whose input gives the vision signal (`integrations.vision`)."""
        raise NotImplementedError

    def vision_attention_signal(self, module: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
        """The signal of every token of one run of `vision_attention`, from the module's own inputs."""
        raise NotImplementedError

    def arrange_vision_signal(self, kind: int, raw: torch.Tensor, arguments: dict) -> torch.Tensor:
        """The flat signal of the visual tokens of one `get_image_features` / `get_video_features` call (whose
        `arguments` are given), in the order the model scatters them into the prompt, from the tower's `raw`."""
        raise NotImplementedError

    def call_state(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, inputs: dict) -> CallState:
        """Kinds and padding of this prompt; raises if its visual tokens do not match the encoded media."""
        ids = input_ids.cpu()
        kinds = torch.full_like(ids, TEXT)
        for kind, name in MEDIA.items():
            token_id = getattr(self.config, f"{name}_token_id", None)
            if token_id is not None:
                kinds[ids == token_id] = kind
        for kind, name in MEDIA.items():
            tokens = int((kinds == kind).sum())
            if tokens and not self.has_media(kind, inputs):
                raise ValueError(
                    f"the prompt holds {tokens} {name} tokens but the call has no {name}s ({PIXELS[kind]}); "
                    "build the prompt with the model's processor from the same media"
                )
            expected = self.expected_tokens(kind, inputs)
            if expected is not None and expected != tokens:
                raise ValueError(
                    f"the prompt holds {tokens} {name} tokens but its {name}s need {expected}; "
                    "build the prompt with the model's processor from the same media"
                )
        padding = torch.zeros_like(kinds, dtype=torch.bool) if attention_mask is None else attention_mask.cpu() == 0
        if padding[:, -1].any():
            raise ValueError("mmtoken needs left padding (tokenizer.padding_side = 'left'); this batch is right-padded")
        return CallState(
            kinds=kinds.to(input_ids.device),
            padding=padding.to(input_ids.device),
            text_counts=((kinds == TEXT) & ~padding).sum(1).tolist(),
            visual_counts=((kinds != TEXT) & ~padding).sum(1).tolist(),
        )

    @staticmethod
    def has_media(kind: int, inputs: dict) -> bool:
        """Whether the call brings media of `kind`: their pixels, or features `generate` encoded ahead."""
        return inputs.get(PIXELS[kind]) is not None or _encoded(kind, inputs) is not None

    def expected_tokens(self, kind: int, inputs: dict) -> int | None:
        """How many tokens of `kind` the call's media fill, when cheap to know before the model runs: from
        features `generate` encoded ahead, else the family's own rule (None: the model checks it itself)."""
        encoded = _encoded(kind, inputs)
        return None if encoded is None else sum(len(item) for item in encoded.pooler_output)

    def geometry(self, call: CallState, run: Callable[[int, int, int], list[torch.Tensor]],
                 position_ids: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
        """(batch, length, 4): media index, frame, row, column of each visual token; -1 for text. `run(row, start,
        end)` gives the embeddings of a row's visual tokens start:end, as tensors one after the other."""
        geometry = torch.full((*call.kinds.shape, 4), -1, dtype=torch.long)
        mrope = position_ids[-3:].cpu() if position_ids is not None and position_ids.ndim == 3 else None
        kinds = call.kinds.cpu()
        for row in range(call.batch_size):
            media = 0
            for kind in MEDIA:
                for start, end in runs(kinds[row] == kind):
                    positions = None if mrope is None else mrope[:, row, start:end]
                    # in blocks: a long video's comparisons would hold a flag per hidden element; frames not yet
                    # encoded stay so, as the split reads only where they are
                    blocks = [
                        block
                        for part in run(row, start, end)
                        for block in (part.detach().split(65536) if torch.is_tensor(part) else (part,))
                    ]
                    for layout in self.split_run(kind, blocks, positions):
                        geometry[row, start : start + len(layout), 0] = media
                        geometry[row, start : start + len(layout), 1:] = layout
                        start, media = start + len(layout), media + 1
        return geometry.to(call.kinds.device)

    def media_outputs(self, inputs: dict) -> dict[int, BaseModelOutputWithPooling]:
        """The call's media through the vision tower and projector, as the model's `get_image_features` /
        `get_video_features` return them (their `pooler_output`, all a prefill reads), by kind; features that
        `generate` encoded ahead are taken as they are."""
        outputs = {}
        for kind, modality in MEDIA.items():
            encoded, pixels = _encoded(kind, inputs), PIXELS[kind]
            if encoded is None and inputs.get(pixels) is not None:
                function = getattr(self.model.model, f"get_{modality}_features")
                # the pixels go first, by position: their parameter's name differs between transformers releases
                wanted = set(inspect.signature(function).parameters) - set(PIXELS.values())
                others = {key: value for key, value in inputs.items() if key in wanted}
                encoded = function(inputs[pixels], **others, return_dict=True)
            if encoded is not None:
                # the tower's own states would double what an encoding holds, caches and sends
                outputs[kind] = BaseModelOutputWithPooling(pooler_output=encoded.pooler_output)
        return outputs

    def media_pieces(self, kind: int, output: BaseModelOutputWithPooling, tokens: int) -> list[torch.Tensor]:
        """The features of `kind` in `output` as (tokens, hidden) pieces (views), in the order the model scatters
        them into the prompt's `tokens` tokens of that kind."""
        return [piece.reshape(-1, piece.shape[-1]) for piece in output.pooler_output]

    def video_runs(self, inputs: dict, frames: int) -> list[torch.Tensor | EncodedFrames] | None:
        """The call's videos as `media_pieces` gives them, but each run of `frames` frames (Qwen: time steps of two
        frames) encoded only when a streaming prefill first reads it (`EncodedFrames`); None where the call brings
        no video pixels to encode (no video, or its features encoded ahead by `generate` or fed by
        `mmtoken.encoding.feeding`)."""
        if inputs.get(PIXELS[VIDEO]) is None or _encoded(VIDEO, inputs) is not None or VIDEO in FED.get():
            return None
        return self.frame_runs(inputs, frames)

    def frame_runs(self, inputs: dict, frames: int) -> list[torch.Tensor | EncodedFrames]:
        """`video_runs` of a call whose video pixels the model is to encode."""
        raise ValueError(f"{self.config.model_type} takes no videos")

    def _frames_features(self, media: dict, tokens: int) -> torch.Tensor:
        """(tokens, hidden): the features of one video's run of frames, whose pixels (and grid) are `media`, as the
        model's own `get_video_features` makes them; a newline it appends (OneVision) closes the video later. Pixels
        left in host memory come to the model's device here, one run at a time."""
        device = self.model.device
        output = self.media_outputs({key: value.to(device, non_blocking=True) for key, value in media.items()})[VIDEO]
        return torch.cat(Adapter.media_pieces(self, VIDEO, output, tokens))[:tokens]
