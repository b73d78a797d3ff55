"""A run of a video's frames whose features are encoded when a streaming prefill first reads them and let go once
it has read the last of them, so that a long video's prefill holds one chunk's features, never the whole video's."""

from __future__ import annotations

from collections.abc import Callable

import torch


class EncodedFrames:
    """The `tokens` features (tokens, hidden) of a run of frames, which `encode` makes through the model's own
    vision tower and projector. `read(start, end)` encodes them the first time and lets go of them once `end`
    reaches their last token: the prefill reads each token once, in order."""

    def __init__(self, tokens: int, encode: Callable[[], torch.Tensor]) -> None:
        self.tokens, self._encode = tokens, encode
        self._features: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.tokens

    def read(self, start: int, end: int) -> torch.Tensor:
        if self._features is None:
            self._features = self._encode()
            if len(self._features) != self.tokens:
                raise ValueError(f"a run of frames was to fill {self.tokens} video tokens but its features have "
                                 f"{len(self._features)}")  # fmt: skip
        features = self._features[start:end]
        if end >= self.tokens:
            self._features = None
        return features
