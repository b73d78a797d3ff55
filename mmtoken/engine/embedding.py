"""A prompt embedded chunk by chunk: the embeddings of its tokens start:end, its media's features written over its
visual tokens as the model's own merge (`masked_scatter`) writes them, without ever making the whole prompt's
embeddings. A long video's prompt then holds, beside its ids and pixels, only one chunk and the features of the
frames it reads, which are encoded as it reads them."""

from __future__ import annotations

import bisect

import torch
from torch import nn

from mmtoken.state import MEDIA


class ChunkedPrompt:
    """The input ids (batch, length) of a prompt whose token kinds are `kinds` (on the CPU), and per media kind the
    features of its tokens as (tokens, hidden) `pieces`, in the order the model scatters them (row by row, then
    along the prompt), embedded by `embed` chunk by chunk. A piece is a tensor, or frames the chunk that first
    reads them encodes (anything with a length and `read(start, end)`, as `EncodedFrames`)."""

    def __init__(self, ids: torch.Tensor, kinds: torch.Tensor, pieces: dict[int, list], embed: nn.Module) -> None:
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
            features = [piece[first:last] if torch.is_tensor(piece) else piece.read(first, last)
                        for before in self._before[kind]
                        for piece, first, last in self._parts(kind, int(before[start]), int(before[end]))]  # fmt: skip
            if features:
                mask = (self.kinds[:, start:end] == kind).to(embeds.device)
                embeds[mask] = torch.cat(features).to(embeds.device, embeds.dtype)
        return embeds

    def run(self, row: int, start: int, end: int) -> list:
        """The embeddings of row `row`'s tokens start:end, which are all visual of one kind (a run, as
        `Adapter.geometry` reads them): views of their features, one after the other, and whole pieces of frames
        not yet encoded as they are (a run holds whole media)."""
        kind = int(self.kinds[row, start])
        before = self._before[kind][row]
        return [piece[first:last] if torch.is_tensor(piece) else piece
                for piece, first, last in self._parts(kind, int(before[start]), int(before[end]))]  # fmt: skip

    def _parts(self, kind: int, first: int, last: int) -> list[tuple[object, int, int]]:
        """Where features first:last of `kind` lie, in scatter order: (piece, start, end) within each piece."""
        parts, starts = self.pieces[kind], self._starts[kind]
        index, taken = bisect.bisect_right(starts, first) - 1, []
        while first < last:
            start = first - starts[index]
            end = min(last - starts[index], len(parts[index]))
            taken.append((parts[index], start, end))
            first, index = first + end - start, index + 1
        return taken
