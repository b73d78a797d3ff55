"""Which tokens are alive where: the per-call bookkeeping that every hook reads."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

TEXT, IMAGE, VIDEO = 0, 1, 2


@dataclass
class TokenSet:
    """The tokens alive in one stretch of decoder layers, for every batch row.

    `position` holds each token's original prompt position (what methods and stats speak in), `slot` its index in
    the sequence the language model received (what masks and rotary embeddings are indexed by), and `valid` is
    False for left padding and for the fillers that keep rows of a batch equally long.
    """

    position: torch.Tensor
    slot: torch.Tensor
    valid: torch.Tensor

    def __len__(self) -> int:
        return self.position.shape[1]

    def take(self, local: torch.Tensor, valid: torch.Tensor) -> TokenSet:
        """The subset at `local` (indices into this set, per row) with the given validity."""
        return TokenSet(self.position.gather(1, local), self.slot.gather(1, local), valid)


@dataclass
class CallState:
    """Everything known about one prefill and the decode steps that follow it.

    `kinds` (text / image / video), `padding` and `geometry` (media, frame, row, column of each visual token;
    -1 for text; filled in once the language model's input is known) are indexed by original prompt position.
    `sets` maps the first layer of each stretch to the tokens alive there; layer 0 is the sequence the language
    model itself receives.
    """

    kinds: torch.Tensor
    padding: torch.Tensor
    geometry: torch.Tensor | None = None
    sets: dict[int, TokenSet] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return self.kinds.shape[0]

    @property
    def prompt_length(self) -> int:
        return self.kinds.shape[1]

    def visual(self, tokens: TokenSet) -> torch.Tensor:
        """Mask over `tokens`: valid image or video tokens."""
        return (self.kinds.gather(1, tokens.position) != TEXT) & tokens.valid

    def set_at(self, layer: int) -> TokenSet:
        """The token set entering decoder layer `layer`."""
        return self.sets[max(start for start in self.sets if start <= layer)]

    def original_visual_counts(self) -> torch.Tensor:
        return ((self.kinds != TEXT) & ~self.padding).sum(1)
