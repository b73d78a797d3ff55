"""One-query attention over a KV cache of fixed capacity, as a graphed decode step runs it (`mmtoken.graphs`).

sdpa given a mask over the whole capacity falls back from its fused kernels to slower ones; this kernel reads the
keys and values once per key-value head for all the query heads that share it (grouped-query attention), skips the
entries the mask hides, and splits the capacity across programs so a single request still fills the GPU; the
splits are combined in torch. `decode_attention` picks the kernel where it applies (a CUDA tensor, a head size
that is a power of two from 16 on) and the reference elsewhere; under `TRITON_INTERPRET=1` (set before this module
is imported) `kernel` also runs on the CPU, which is how CI checks it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference still works without Triton
    triton = None

BLOCK_N = 32
_PROGRAMS = 264  # about two per streaming multiprocessor of an H100 / H200


def reference(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, allowed: torch.Tensor, scale: float
) -> torch.Tensor:
    """query (batch, query heads, 1, head dim), keys and values (batch, key-value heads, capacity, head dim),
    allowed (batch, capacity): the attention output, (batch, query heads, 1, head dim)."""
    groups = query.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(groups, 1), values.repeat_interleave(groups, 1)
    return F.scaled_dot_product_attention(query, keys, values, attn_mask=allowed[:, None, None, :], scale=scale)


def applies(query: torch.Tensor) -> bool:
    """Whether the kernel can take this query: one position, a head size that is a power of two from 16 on."""
    size = query.shape[-1]
    return triton is not None and query.shape[2] == 1 and size >= 16 and size & (size - 1) == 0


def decode_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, allowed: torch.Tensor, scale: float
) -> torch.Tensor:
    """`reference`'s result: from the Triton kernel on a GPU where it applies, else from the reference."""
    if query.is_cuda and applies(query):
        return kernel(query, keys, values, allowed, scale)
    return reference(query, keys, values, allowed, scale)


def kernel(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, allowed: torch.Tensor, scale: float
) -> torch.Tensor:
    """`reference`'s result from the Triton kernel (on the CPU only under `TRITON_INTERPRET=1`)."""
    batch, heads, _, size = query.shape
    kv_heads, capacity = keys.shape[1], keys.shape[2]
    blocks = triton.cdiv(capacity, BLOCK_N)
    splits = max(1, min(blocks, triton.cdiv(_PROGRAMS, batch * kv_heads)))
    chunk = triton.cdiv(blocks, splits) * BLOCK_N
    splits = triton.cdiv(capacity, chunk)
    group = heads // kv_heads
    partial = query.new_empty(batch, heads, splits, size, dtype=torch.float32)
    maxima = query.new_empty(batch, heads, splits, dtype=torch.float32)
    sums = torch.empty_like(maxima)
    keys, values, allowed = keys.contiguous(), values.contiguous(), allowed.contiguous().view(torch.uint8)
    _split_kernel[(batch * kv_heads, splits)](
        query, keys, values, allowed, partial, maxima, sums,
        query.stride(0), query.stride(1), keys.stride(0), keys.stride(1), keys.stride(2), allowed.stride(0),
        kv_heads, capacity, chunk, scale,
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), SIZE=size, BLOCK_N=BLOCK_N,
        PRECISION="ieee" if query.dtype == torch.float32 else "tf32",  # tf32: tensor cores, exact for 16-bit inputs
    )  # fmt: skip
    weight = torch.exp(maxima - maxima.amax(-1, keepdim=True))
    out = (partial * weight[..., None]).sum(2) / (sums * weight).sum(-1)[..., None]
    return out[:, :, None].to(query.dtype)


if triton is not None:

    @triton.jit
    def _split_kernel(
        q_ptr, k_ptr, v_ptr, allowed_ptr, partial_ptr, maxima_ptr, sums_ptr,
        stride_qb, stride_qh, stride_kb, stride_kh, stride_kn, stride_ab,
        kv_heads, capacity, chunk, scale,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
        PRECISION: tl.constexpr,
    ):  # fmt: skip
        """One (batch row, key-value head) over one chunk of the capacity: an online softmax for the query heads of
        the group, written as unnormalised output, running maximum and sum per head."""
        row_and_head, split = tl.program_id(0), tl.program_id(1)
        row, kv_head = row_and_head // kv_heads, row_and_head % kv_heads
        members = tl.arange(0, GROUP_PAD)
        member_ok = members < GROUP
        heads = kv_head * GROUP + members
        dims = tl.arange(0, SIZE)
        query = tl.load(q_ptr + row * stride_qb + heads[:, None] * stride_qh + dims[None, :],
                        mask=member_ok[:, None], other=0.0)  # fmt: skip
        maximum = tl.full([GROUP_PAD], -1e30, tl.float32)
        total = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, SIZE], tl.float32)
        base = row * stride_kb + kv_head * stride_kh
        start = split * chunk
        for first in range(start, start + chunk, BLOCK_N):
            entries = first + tl.arange(0, BLOCK_N)
            inside = entries < capacity
            ok = (tl.load(allowed_ptr + row * stride_ab + entries, mask=inside, other=0) != 0) & inside
            offsets = base + entries[:, None] * stride_kn + dims[None, :]
            key = tl.load(k_ptr + offsets, mask=inside[:, None], other=0.0)
            scores = tl.dot(query, tl.trans(key), input_precision=PRECISION)
            scores = tl.where(ok[None, :], scores * scale, -1e30)
            new_maximum = tl.maximum(maximum, tl.max(scores, 1))
            weights = tl.where(ok[None, :], tl.exp(scores - new_maximum[:, None]), 0.0)
            decay = tl.exp(maximum - new_maximum)
            total = total * decay + tl.sum(weights, 1)
            value = tl.load(v_ptr + offsets, mask=inside[:, None], other=0.0)
            acc = acc * decay[:, None] + tl.dot(weights.to(value.dtype), value, input_precision=PRECISION)
            maximum = new_maximum
        splits = tl.num_programs(1)
        out = (row * kv_heads * GROUP + heads) * splits + split
        tl.store(partial_ptr + out[:, None] * SIZE + dims[None, :], acc, mask=member_ok[:, None])
        tl.store(maxima_ptr + out, maximum, mask=member_ok)
        tl.store(sums_ptr + out, total, mask=member_ok)
