"""DivPrune's greedy max-min pick: from a first token, repeatedly the candidate farthest from all picked so far.

The pick is sequential, so in torch every step is a few kernels (gather the picked row of distances, take the
minimum, mask, argmax): launches dominate. The Triton kernel runs one program per batch row that keeps the row's
distances to the picked set in registers and takes every step inside one launch. `greedy_order` picks the kernel
on a CUDA tensor whose rows fit one program (up to `MAX_TOKENS` tokens) and the reference elsewhere; under
`TRITON_INTERPRET=1` (set before this module is imported) `kernel` also runs on the CPU, which is how CI checks it.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference still works without Triton
    triton = None

MAX_TOKENS = 16384


def reference(distance: torch.Tensor, candidates: torch.Tensor, first: torch.Tensor, count: int) -> torch.Tensor:
    """distance (batch, n, n) float32, candidates (batch, n), first (batch, 1) the first pick of each row: the
    first `count` picks of each row, (batch, count), -1 once a row has run out of candidates."""
    closest = torch.where(candidates, float("inf"), float("-inf"))  # picked and non-candidates stay -inf
    picked, order = first, []
    for _ in range(count):
        order.append(torch.where(closest.gather(1, picked) > float("-inf"), picked, -1))
        row = distance.gather(1, picked[..., None].expand(-1, -1, distance.shape[2])).squeeze(1)
        closest = torch.minimum(closest, row).scatter_(1, picked, float("-inf"))
        picked = closest.argmax(1, keepdim=True)
    return torch.cat(order, 1) if order else first.new_zeros(len(first), 0)


def greedy_order(distance: torch.Tensor, candidates: torch.Tensor, first: torch.Tensor, count: int) -> torch.Tensor:
    """`reference`'s result: from the Triton kernel on a GPU where a row fits one program, else the reference."""
    if distance.is_cuda and triton is not None and distance.shape[-1] <= MAX_TOKENS:
        return kernel(distance, candidates, first, count)
    return reference(distance, candidates, first, count)


def kernel(distance: torch.Tensor, candidates: torch.Tensor, first: torch.Tensor, count: int) -> torch.Tensor:
    """`reference`'s result from the Triton kernel (on the CPU only under `TRITON_INTERPRET=1`)."""
    batch, length = candidates.shape
    order = first.new_empty(batch, count)
    block = triton.next_power_of_2(length)
    distance, first = distance.contiguous(), first.contiguous()
    _greedy_kernel[(batch,)](
        distance, candidates.contiguous().view(torch.uint8), first, order, length, count,
        BLOCK=block, num_warps=min(16, max(4, block // 512)),
    )  # fmt: skip
    return order


if triton is not None:

    @triton.jit
    def _greedy_kernel(distance_ptr, candidates_ptr, first_ptr, order_ptr, length, count, BLOCK: tl.constexpr):
        """One batch row: every pick of the greedy order, the row's distances to the picked set held throughout."""
        row = tl.program_id(0).to(tl.int64)
        tokens = tl.arange(0, BLOCK)
        inside = tokens < length
        candidate = (tl.load(candidates_ptr + row * length + tokens, mask=inside, other=0) != 0) & inside
        closest = tl.where(candidate, float("inf"), float("-inf"))
        picked = tl.load(first_ptr + row)
        for step in range(count):
            alive = tl.max(tl.where(tokens == picked, closest, float("-inf")), 0) > float("-inf")
            tl.store(order_ptr + row * count + step, tl.where(alive, picked, -1))
            far = tl.load(distance_ptr + (row * length + picked) * length + tokens, mask=inside, other=0.0)
            closest = tl.where(tokens == picked, float("-inf"), tl.minimum(closest, far))
            picked = tl.argmax(closest, 0).to(tl.int64)
