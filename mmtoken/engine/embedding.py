"""A prompt embedded chunk by chunk: the embeddings of its tokens start:end, its media's features written over its
visual tokens as the model's own merge (`masked_scatter`) writes them, without ever making the whole prompt's
embeddings. A long video's prompt then holds, beside its ids, only its media's features and one chunk."""

from __future__ import annotations

import bisect

import torch
from torch import nn

from mmtoken.state import MEDIA


class ChunkedPrompt:
    """The input ids (batch, length) of a prompt whose token kinds are `kinds` (on the CPU), and per media kind the
    features of its tokens as (tokens, hidden) `pieces`, in the order the model scatters them (row by row, then
    along the prompt), embedded by `embed` chunk by chunk."""

    def __init__(self, ids: torch.Tensor, kinds: torch.Tensor, pieces: dict[int, list[torch.Tensor]],
                 embed: nn.Module) -> None:  # fmt: skip
        self.ids, self.kinds, self.embed = ids, kinds, embed
        self.pieces = {kind: parts for kind, parts in pieces.items() if parts}
        held = {kind: sum(map(len, parts)) for kind, parts in pieces.items()}
        for kind, name in MEDIA.items():
            tokens = int((kinds == kind).sum())
            if held.get(kind, 0) != tokens:
                raise ValueError(f"the prompt holds {tokens} {name} tokens but its {name}s' features have "
                                 f"{held.get(kind, 0)}; build the prompt with the model's processor from the same "
                                 "media")  # fmt: skip
        # per kind, (batch, length + 1): how many of the kind's features the tokens before each token of each row use
        self._before, self._starts = {}, {}
        for kind, parts in pieces.items():
            counts = (kinds == kind).long()
            earlier_rows = torch.cat([counts.new_zeros(1), counts.sum(1).cumsum(0)[:-1]])
            self._before[kind] = (
                torch.cat([counts.new_zeros(len(counts), 1), counts.cumsum(1)], 1) + earlier_rows[:, None]
            )
            self._starts[kind] = [0, *torch.tensor([len(part) for part in parts]).cumsum(0).tolist()]

    def embeddings(self, start: int, end: int) -> torch.Tensor:
        """(batch, end - start, hidden): the embeddings of the prompt's tokens start:end, media included."""
        embeds = self.embed(self.ids[:, start:end])
        for kind in self.pieces:
            features = torch.cat([part for before in self._before[kind]
                                  for part in self._parts(kind, int(before[start]), int(before[end]))])  # fmt: skip
            if len(features):
                mask = (self.kinds[:, start:end] == kind).to(embeds.device)
                embeds[mask] = features.to(embeds.device, embeds.dtype)
        return embeds

    def run(self, row: int, start: int, end: int) -> list[torch.Tensor]:
        """The embeddings of row `row`'s tokens start:end, which are all visual of one kind (a run, as
        `Adapter.geometry` reads them): views of their features, one after the other."""
        kind = int(self.kinds[row, start])
        before = self._before[kind][row]
        return self._parts(kind, int(before[start]), int(before[end]))

    def _parts(self, kind: int, first: int, last: int) -> list[torch.Tensor]:
        """Features first:last of `kind`, in scatter order: views of the pieces they lie in."""
        parts, starts = self.pieces[kind], self._starts[kind]
        index, taken = bisect.bisect_right(starts, first) - 1, [parts[0][:0]]
        while first < last:
            piece = parts[index][first - starts[index] : last - starts[index]]
            taken.append(piece)
            first, index = first + len(piece), index + 1
        return taken
