"""The prefill and decode stages with continuous batching: a request is prefilled when it arrives, with the others
that arrive with it, and its rows join the batch that is decoding (`mmtoken.engine.joining`); a row leaves the
batch as soon as its request ends, so the batch never waits for its longest request. Greedy decoding, one token
per step, as `generate(do_sample=False)` decodes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mmtoken.compat import cache_of, generation_positions, with_cache
from mmtoken.encoding import Encoded, feeding
from mmtoken.engine.joining import Rows, join_rows


@dataclass
class Decoding:
    """A batch of rows decoding together: `rows` (cache, seen mask), each row's position of its last token
    (`positions`, (..., batch, 1) as the model takes them) and its last token (`tokens`, batch)."""

    rows: Rows
    positions: torch.Tensor
    tokens: torch.Tensor

    @property
    def size(self) -> int:
        return len(self.rows.rows)


def _batch_dim(positions: torch.Tensor) -> int:
    return 1 if positions.ndim == 3 else 0


@torch.no_grad()
def prefill(model: nn.Module, inputs: dict, encoded: Encoded) -> Decoding:
    """Prefill the rows of `inputs` (one left-padded batch, already on the model's device) from their `encoded`
    media; their first tokens are `tokens`."""
    positions = generation_positions(model, inputs)
    with feeding(model, encoded):
        output = model(**inputs, position_ids=positions, use_cache=True, **with_cache(None))
    cache = cache_of(output)
    rows = Rows(cache, inputs["attention_mask"], list(range(inputs["input_ids"].shape[0])))
    return Decoding(rows, positions[..., -1:], output.logits[:, -1].argmax(-1))


@torch.no_grad()
def step(model: nn.Module, decoding: Decoding) -> None:
    """One decode step of every row: feeds each row's last token, which becomes its new last token."""
    rows = decoding.rows
    seen = torch.cat([rows.seen, rows.seen.new_ones(rows.seen.shape[0], 1)], 1)
    positions = decoding.positions + 1
    output = model(input_ids=decoding.tokens[:, None], attention_mask=seen, position_ids=positions, use_cache=True,
                   **with_cache(rows.cache))  # fmt: skip
    decoding.rows = Rows(cache_of(output), seen, rows.rows)
    decoding.positions, decoding.tokens = positions, output.logits[:, -1].argmax(-1)


def joined(parts: list[Decoding], keep: list[list[int]]) -> Decoding | None:
    """One batch of the rows `keep[i]` (indices into `parts[i]`'s batch) of each of `parts`, in order; None when no
    row is kept."""
    chosen = [(part, rows) for part, rows in zip(parts, keep, strict=True) if rows]
    if not chosen:
        return None
    cache, seen = join_rows([Rows(part.rows.cache, part.rows.seen, rows) for part, rows in chosen])
    dim = _batch_dim(chosen[0][0].positions)
    positions, tokens = [], []
    for part, rows in chosen:
        index = torch.tensor(rows, device=part.tokens.device)
        positions.append(part.positions.index_select(dim, index))
        tokens.append(part.tokens.index_select(0, index))
    return Decoding(Rows(cache, seen, list(range(sum(map(len, keep))))), torch.cat(positions, dim), torch.cat(tokens))
