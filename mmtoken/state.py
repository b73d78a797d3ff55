"""Token state: which tokens are alive where, per call and batch row; the bookkeeping every hook and adapter reads."""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import cached_property

import torch

TEXT, IMAGE, VIDEO = 0, 1, 2
MEDIA = {IMAGE: "image", VIDEO: "video"}  # the modality names transformers uses (get_image_features, ...)
PIXELS = {IMAGE: "pixel_values", VIDEO: "pixel_values_videos"}  # the processor's output holding each one's pixels
# the media kinds whose features `mmtoken.encoding.feeding` hands the model in this thread instead of its encoders
FED: ContextVar[frozenset[int]] = ContextVar("mmtoken_fed", default=frozenset())


@dataclass
class TokenSet:
    """The tokens alive in one stretch of decoder layers, for every batch row.

    `position` holds each token's original prompt position (what methods and stats speak in), `slot` its index in
    the sequence the language model received (what masks and rotary embeddings are indexed by), and `valid` is
    False for left padding and for the fillers that keep rows of a batch equally long. `visual_counts` (valid
    visual tokens per row) and `complete` (no invalid token) are kept on the CPU so hooks never wait on the GPU.
    `weight` is each token's merge weight: how many original tokens it stands for (1 until a merge).
    """

    position: torch.Tensor
    slot: torch.Tensor
    valid: torch.Tensor
    visual_counts: list[int]
    complete: bool
    weight: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.position.shape[1]


@dataclass
class CallState:
    """Everything known about one prefill and the decode steps that follow it.

    `kinds` (text / image / video) and `padding` are indexed by original prompt position, and so is `geometry`
    (media, frame, row, column of each visual token, -1 for text), computed from `locate` the first time a
    method asks. `text_counts` and `visual_counts` count each row's valid tokens on the CPU. `sets` maps the
    first layer of each stretch to the tokens alive there; layer 0 is the sequence the language model receives.
    `vision_signal` is the vision encoder's attention to each visual token, by original position, for methods
    that need it.
    """

    kinds: torch.Tensor
    padding: torch.Tensor
    text_counts: list[int]
    visual_counts: list[int]
    locate: Callable[[], torch.Tensor] | None = None
    vision_signal: torch.Tensor | None = None
    sets: dict[int, TokenSet] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return self.kinds.shape[0]

    @property
    def prompt_length(self) -> int:
        return self.kinds.shape[1]

    @cached_property
    def geometry(self) -> torch.Tensor:
        return self.locate()

    def visual(self, tokens: TokenSet) -> torch.Tensor:
        """Mask over `tokens`: valid image or video tokens."""
        return (self.kinds.gather(1, tokens.position) != TEXT) & tokens.valid

    def geometry_of(self, tokens: TokenSet) -> torch.Tensor:
        """(batch, len(tokens), 4): media, frame, row, column of each token of `tokens` (-1 for text)."""
        return self.geometry.gather(1, tokens.position[..., None].expand(-1, -1, 4))

    def visual_geometry(self) -> dict[int, list[torch.Tensor]]:
        """For each stretch, keyed by its first layer: per batch row, the (n, 4) media, frame, row and column of the
        valid visual tokens alive there, on the CPU."""
        alive = {}
        for start, tokens in sorted(self.sets.items()):
            geometry, visual = self.geometry_of(tokens).cpu(), self.visual(tokens).cpu()
            alive[start] = [geometry[row][visual[row]] for row in range(self.batch_size)]
        return alive

    def stretch_of(self, layer: int) -> int:
        """The first layer of the stretch that decoder layer `layer` belongs to."""
        return max(start for start in self.sets if start <= layer)

    def set_at(self, layer: int) -> TokenSet:
        """The token set entering decoder layer `layer`."""
        return self.sets[self.stretch_of(layer)]
