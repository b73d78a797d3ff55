"""Gathering token rows: the states of the tokens that survive a cut, or the key and value entries a cache keeps.

`torch.gather` needs its index expanded to the output's full shape, so it reads eight bytes of index for every
element it copies; this kernel reads each row's index once and copies whole rows. `gather_rows` picks the kernel
on a CUDA tensor and the reference elsewhere; under `TRITON_INTERPRET=1` (set before this module is imported)
`kernel` also runs on the CPU, which is how CI checks it.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference still works without Triton
    triton = None

BLOCK_ROWS = 16
BLOCK_SIZE = 128


def reference(source: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """source (batch or 1, heads, n, size), index (batch, m): out[b, h, j] = source[b, h, index[b, j]]."""
    source = source.expand(index.shape[0], *source.shape[1:])
    return source.gather(2, index[:, None, :, None].expand(-1, source.shape[1], -1, source.shape[3]))


def gather_rows(source: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`reference`'s result: from the Triton kernel on a GPU, else from the reference."""
    if source.is_cuda and triton is not None:
        return kernel(source, index)
    return reference(source, index)


def kernel(source: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`reference`'s result from the Triton kernel (on the CPU only under `TRITON_INTERPRET=1`)."""
    source = source.expand(index.shape[0], *source.shape[1:])
    batch, heads, _, size = source.shape
    rows = index.shape[1]
    out = source.new_empty(batch, heads, rows, size)
    index = index.contiguous()
    grid = (batch * heads, triton.cdiv(rows, BLOCK_ROWS), triton.cdiv(size, BLOCK_SIZE))
    _gather_kernel[grid](
        source, index, out, *source.stride(), index.stride(0), heads, rows, size,
        BLOCK_ROWS=BLOCK_ROWS, BLOCK_SIZE=BLOCK_SIZE,
    )  # fmt: skip
    return out


if triton is not None:

    @triton.jit
    def _gather_kernel(
        source_ptr, index_ptr, out_ptr,
        stride_b, stride_h, stride_n, stride_d, stride_ib,
        heads, rows, size,
        BLOCK_ROWS: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    ):  # fmt: skip
        """One block of rows and columns of one (batch row, head): copy the indexed source rows."""
        row_and_head, block, column_block = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        row, head = row_and_head // heads, row_and_head % heads
        targets = block * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        columns = column_block * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        inside = (targets < rows)[:, None] & (columns < size)[None, :]
        picked = tl.load(index_ptr + row * stride_ib + targets, mask=targets < rows, other=0)
        offsets = row * stride_b + head * stride_h + picked[:, None] * stride_n + columns[None, :] * stride_d
        values = tl.load(source_ptr + offsets, mask=inside)
        out = ((row * heads + head) * rows + targets[:, None]) * size + columns[None, :]
        tl.store(out_ptr + out, values, mask=inside)
