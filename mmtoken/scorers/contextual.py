"""VisionZip's dominant and contextual tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mmtoken.scorers.base import ScoreInput
from mmtoken.scorers.groups import Grouping, row_targets


def dominant_contextual_targets(
    signal: torch.Tensor, features: torch.Tensor, dominant: int, contextual: int
) -> torch.Tensor:
    """Targets (positions in the n tokens) that keep the `dominant` tokens of highest `signal` as they are, and
    `contextual` tokens evenly spaced among the rest, into which every other token merges, by the cosine similarity
    of `features` (n x dim); with no contextual token the rest leave."""
    length = len(signal)
    target = torch.arange(length, device=signal.device)
    if dominant + contextual >= length:
        return target
    rest = signal.argsort(descending=True, stable=True)[dominant:].sort().values
    if contextual == 0:
        target[rest] = -1
        return target
    heads = rest[:: max(1, len(rest) // contextual)][:contextual]
    unit = F.normalize(features.float(), dim=-1)
    target[rest] = heads[(unit[rest] @ unit[heads].T).argmax(dim=1)]
    target[heads] = heads
    return target


@dataclass
class DominantContextual(Grouping):
    """VisionZip (Yang et al., arXiv 2412.04467): of the tokens a row keeps, the share `1 - contextual` are the
    dominant ones, with the highest vision-encoder attention; the remaining `contextual` share are contextual tokens,
    each the merge of an evenly spaced seed and the leftover tokens most similar to it (the paper compares the tower's
    keys; here the states that enter the language model). Merges are weighted by merge weights."""

    contextual: float

    def group(self, inputs: ScoreInput) -> torch.Tensor:
        def assign(row: int, index: torch.Tensor) -> torch.Tensor:
            keep = inputs.keep[row]
            contextual = round(keep * self.contextual)
            signal, features = inputs.vision_signal[row, index], inputs.hidden[row, index]
            return dominant_contextual_targets(signal, features, keep - contextual, contextual)

        return row_targets(inputs, assign)
