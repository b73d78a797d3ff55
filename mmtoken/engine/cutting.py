"""Making a planned cut: score the visual tokens of a token set, keep the planned number of each row, reduce the
rest into the survivors."""

from __future__ import annotations

import torch
from torch import nn

from mmtoken.engine.plan import PlannedCut
from mmtoken.engine.request import Request
from mmtoken.engine.select import select
from mmtoken.ops import gather_tokens
from mmtoken.scorers.base import ScoreInput, decides_count
from mmtoken.state import CallState, TokenSet


def cuts_at(
    request: Request, layer: int, module: nn.Module | None, tokens: TokenSet, hidden: torch.Tensor, kwargs: dict | None
) -> tuple[TokenSet, torch.Tensor]:
    """Make the cuts planned at `layer` (whose decoder layer is `module`; None before the language model) one
    after the other: more than one only where pipeline steps meet. A cut that `resume`s extends the plan. A cut that
    keeps every visual token it is given is skipped: `tokens` come back as they were, the same object."""
    plan, done = request.prefill.plan, 0
    while done < len(plan.cuts[layer]):
        planned = plan.cuts[layer][done]
        if decides_count(planned.scorer) or any(
            keep < alive for keep, alive in zip(planned.keep, tokens.visual_counts, strict=True)
        ):
            tokens, hidden = _cut(request, planned, module, tokens, hidden, kwargs)
        resume = planned.resume
        if resume is not None:
            plan.extend(resume.counts(tokens.visual_counts), resume.step, resume.after, hidden.device)
        done += 1
    return tokens, hidden


def _score_input(call: CallState, tokens: TokenSet, hidden: torch.Tensor, keep: list[int]) -> ScoreInput:
    return ScoreInput(
        hidden=hidden,
        layer=None,
        position_embeddings=None,
        candidates=call.visual(tokens),
        valid=tokens.valid,
        locate=lambda: call.geometry_of(tokens),
        kinds=call.kinds.gather(1, tokens.position),
        weight=tokens.weight,
        keep=keep,
        visual_counts=tokens.visual_counts,
        measure=lambda: call.vision_signal.gather(1, tokens.position),
    )


def _cut(
    request: Request,
    planned: PlannedCut,
    module: nn.Module | None,
    tokens: TokenSet,
    hidden: torch.Tensor,
    kwargs: dict | None,
) -> tuple[TokenSet, torch.Tensor]:
    """Score the visual tokens of `tokens` and keep the planned number of each row."""
    call, scorer = request.call, planned.scorer
    kept = [min(count, alive) for count, alive in zip(planned.keep, tokens.visual_counts, strict=True)]
    inputs = _score_input(call, tokens, hidden, kept)
    if scorer.layer_offset == 0:
        cos, sin = kwargs["position_embeddings"]
        inputs.layer = module
        inputs.position_embeddings = (gather_tokens(cos, tokens.slot), gather_tokens(sin, tokens.slot))
    elif scorer.layer_offset == -1:
        inputs.layer, inputs.hidden, inputs.position_embeddings = request.prefill.previous
    # a bucketed prefill keeps its padding, so that each cut's width follows from counts the signature holds
    keep_invalid = request.prefill.keep_padding
    others = [len(tokens) - alive for alive in tokens.visual_counts] if keep_invalid else call.text_counts
    sizes = [other + visual for other, visual in zip(others, kept, strict=True)]
    counted = not decides_count(scorer)
    local, valid = select(scorer.score(inputs), inputs.candidates, tokens.valid, planned.keep_on_device,
                          max(sizes) if counted else None, keep_invalid)  # fmt: skip
    survivors = TokenSet(tokens.position.gather(1, local), tokens.slot.gather(1, local), valid, kept, False)
    if not counted:
        survivors.visual_counts = call.visual(survivors).sum(1).tolist()
        sizes = [other + visual for other, visual in zip(others, survivors.visual_counts, strict=True)]
    survivors.complete = min(sizes) == len(survivors) and (tokens.complete or not keep_invalid)
    inputs.hidden = hidden
    hidden, survivors.weight = planned.reducer.reduce(hidden, local, valid, inputs)
    return survivors, hidden
