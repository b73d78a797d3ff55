"""Value norm: the entries whose values carry the most."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmtoken.kv.base import PressInput


@dataclass
class ValueNorm:
    """The L2 norm of each entry's value, averaged over key-value heads: InfiniPot-V's query-agnostic value-norm
    rule (Kim et al., arXiv 2506.15745), which needs no question and so serves several turns alike."""

    window: int = 0

    def score(self, inputs: PressInput) -> torch.Tensor:
        return inputs.values.float().norm(dim=-1).mean(dim=1)
