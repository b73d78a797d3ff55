"""The attention one query row pays to every key, averaged over heads: what FastV, PyramidDrop and FEATHER rank by.

The torch reference rotates every key, repeats them for the query heads that share them, multiplies, masks, takes
the softmax and averages over heads: a dozen kernels and a (batch, heads, n) copy of the keys. The Triton kernel
reads the projected keys once per key-value head, rotates them as it loads them, and runs the masked softmax of
every query head of the group in two passes over the keys (the maximum and sum, then the weights), writing the
group's summed weights. `query_scores` picks the kernel where it applies (a CUDA tensor, a head size that is a
power of two from 32 on) and the reference elsewhere; under `TRITON_INTERPRET=1` (set before this module is
imported) `kernel` also runs on the CPU, which is how CI checks it.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference still works without Triton
    triton = None

BLOCK_N = 64


def _rotate(states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    first, second = states.chunk(2, dim=-1)
    return states * cos + torch.cat([-second, first], dim=-1) * sin


def reference(
    query: Tensor, keys: Tensor, cos: Tensor | None, sin: Tensor | None, valid: Tensor, scale: float
) -> Tensor:
    """query (batch, heads, size), already rotated; keys (batch, n, key-value heads, size) as projected, rotated here
    by `cos` and `sin` (batch, n, size; None: no rotary embedding); valid (batch, n). Returns the softmax over the
    valid keys of each head's scaled logits, averaged over heads: (batch, n), float32."""
    if cos is not None:
        keys = _rotate(keys, cos[:, :, None], sin[:, :, None])
    keys = keys.transpose(1, 2).repeat_interleave(query.shape[1] // keys.shape[2], dim=1)
    logits = (query[:, :, None] @ keys.transpose(2, 3)).squeeze(2).float() * scale
    return logits.masked_fill(~valid[:, None, :], float("-inf")).softmax(dim=-1).mean(dim=1)


def applies(query: torch.Tensor) -> bool:
    """Whether the kernel can take this query: a head size that is a power of two from 32 on (each half of it, as
    the rotary embedding splits it, a power of two from 16 on)."""
    size = query.shape[-1]
    return triton is not None and size >= 32 and size & (size - 1) == 0


def query_scores(
    query: Tensor, keys: Tensor, cos: Tensor | None, sin: Tensor | None, valid: Tensor, scale: float
) -> Tensor:
    """`reference`'s result: from the Triton kernel on a GPU where it applies, else from the reference."""
    if query.is_cuda and applies(query):
        return kernel(query, keys, cos, sin, valid, scale)
    return reference(query, keys, cos, sin, valid, scale)


def kernel(query: Tensor, keys: Tensor, cos: Tensor | None, sin: Tensor | None, valid: Tensor, scale: float) -> Tensor:
    """`reference`'s result from the Triton kernel (on the CPU only under `TRITON_INTERPRET=1`)."""
    batch, heads, size = query.shape
    length, kv_heads = keys.shape[1], keys.shape[2]
    group = heads // kv_heads
    rope = cos is not None
    if not rope:
        cos = sin = keys.new_empty(batch, 1, size)  # never read
    cos, sin = cos.expand(batch, -1, -1), sin.expand(batch, -1, -1)
    summed = query.new_empty(batch, kv_heads, length, dtype=torch.float32)
    _scores_kernel[(batch * kv_heads,)](
        query, keys, cos, sin, valid.contiguous().view(torch.uint8), summed,
        query.stride(0), query.stride(1), keys.stride(0), keys.stride(1), keys.stride(2),
        cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1), valid.stride(0),
        kv_heads, length, scale,
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HALF=size // 2, BLOCK_N=BLOCK_N, ROPE=rope,
        PRECISION="ieee" if query.dtype == torch.float32 else "tf32",  # tf32: tensor cores, exact for 16-bit inputs
    )  # fmt: skip
    return summed.sum(1) / heads


if triton is not None:

    @triton.jit
    def _logits(
        q_first, q_second, k_ptr, cos_ptr, sin_ptr, entries, inside, halves, key_base, stride_kn,
        cos_base, stride_cn, sin_base, stride_sn, HALF: tl.constexpr, ROPE: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        """(group, block) logits of the group's queries against one block of keys, rotated as they are loaded."""
        first = tl.load(k_ptr + key_base + entries[:, None] * stride_kn + halves[None, :], mask=inside[:, None],
                        other=0.0).to(tl.float32)  # fmt: skip
        second = tl.load(k_ptr + key_base + entries[:, None] * stride_kn + HALF + halves[None, :],
                         mask=inside[:, None], other=0.0).to(tl.float32)  # fmt: skip
        if ROPE:
            spot = entries[:, None]
            cos_1 = tl.load(cos_ptr + cos_base + spot * stride_cn + halves[None, :], mask=inside[:, None], other=0.0)
            cos_2 = tl.load(cos_ptr + cos_base + spot * stride_cn + HALF + halves[None, :], mask=inside[:, None],
                            other=0.0)  # fmt: skip
            sin_1 = tl.load(sin_ptr + sin_base + spot * stride_sn + halves[None, :], mask=inside[:, None], other=0.0)
            sin_2 = tl.load(sin_ptr + sin_base + spot * stride_sn + HALF + halves[None, :], mask=inside[:, None],
                            other=0.0)  # fmt: skip
            first, second = first * cos_1 - second * sin_1, second * cos_2 + first * sin_2
        logits = tl.dot(q_first, tl.trans(first.to(q_first.dtype)), input_precision=PRECISION)
        return logits + tl.dot(q_second, tl.trans(second.to(q_second.dtype)), input_precision=PRECISION)

    @triton.jit
    def _scores_kernel(
        q_ptr, k_ptr, cos_ptr, sin_ptr, valid_ptr, out_ptr,
        stride_qb, stride_qh, stride_kb, stride_kn, stride_kh,
        stride_cb, stride_cn, stride_sb, stride_sn, stride_vb,
        kv_heads, length, scale,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HALF: tl.constexpr, BLOCK_N: tl.constexpr,
        ROPE: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        """One (batch row, key-value head): the masked softmax of each query head of its group over all keys, in two
        passes, written as the sum over the group of the weights."""
        program = tl.program_id(0)
        row, kv_head = program // kv_heads, program % kv_heads
        members = tl.arange(0, GROUP_PAD)
        member_ok = members < GROUP
        halves = tl.arange(0, HALF)
        query_rows = q_ptr + row * stride_qb + (kv_head * GROUP + members)[:, None] * stride_qh
        q_first = tl.load(query_rows + halves[None, :], mask=member_ok[:, None], other=0.0)
        q_second = tl.load(query_rows + HALF + halves[None, :], mask=member_ok[:, None], other=0.0)
        key_base = row * stride_kb + kv_head * stride_kh
        cos_base, sin_base = row * stride_cb, row * stride_sb
        maximum = tl.full([GROUP_PAD], -1e30, tl.float32)
        total = tl.zeros([GROUP_PAD], tl.float32)
        for first in range(0, length, BLOCK_N):
            entries = first + tl.arange(0, BLOCK_N)
            inside = entries < length
            ok = (tl.load(valid_ptr + row * stride_vb + entries, mask=inside, other=0) != 0) & inside
            logits = _logits(q_first, q_second, k_ptr, cos_ptr, sin_ptr, entries, inside, halves, key_base,
                             stride_kn, cos_base, stride_cn, sin_base, stride_sn, HALF, ROPE, PRECISION)  # fmt: skip
            logits = tl.where(ok[None, :], logits * scale, -1e30)
            new_maximum = tl.maximum(maximum, tl.max(logits, 1))
            total = total * tl.exp(maximum - new_maximum) + tl.sum(tl.exp(logits - new_maximum[:, None]), 1)
            maximum = new_maximum
        for first in range(0, length, BLOCK_N):
            entries = first + tl.arange(0, BLOCK_N)
            inside = entries < length
            ok = (tl.load(valid_ptr + row * stride_vb + entries, mask=inside, other=0) != 0) & inside
            logits = _logits(q_first, q_second, k_ptr, cos_ptr, sin_ptr, entries, inside, halves, key_base,
                             stride_kn, cos_base, stride_cn, sin_base, stride_sn, HALF, ROPE, PRECISION)  # fmt: skip
            weights = tl.exp(tl.where(ok[None, :], logits * scale, -1e30) - maximum[:, None]) / total[:, None]
            weights = tl.where(ok[None, :] & member_ok[:, None], weights, 0.0)
            tl.store(out_ptr + program * length + entries, tl.sum(weights, 0), mask=inside)
