"""Each Triton kernel equals its torch reference at small shapes: on a GPU where there is one, else on the CPU under
TRITON_INTERPRET=1 (conftest sets it where no GPU is); at real shapes in tests/test_gpu.py."""

from __future__ import annotations

import pytest
import torch

from mmtoken.kernels import decode_attention as kernel

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _case(batch, heads, kv_heads, capacity, size, dtype=torch.float32, device=DEVICE, seed=0):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, 1, heads, size, generator=generator).transpose(1, 2)  # strided, as a model makes it
    keys = torch.randn(batch, kv_heads, capacity, size, generator=generator)
    values = torch.randn(batch, kv_heads, capacity, size, generator=generator)
    allowed = torch.rand(batch, capacity, generator=generator) < 0.7
    allowed[:, capacity // 2 :] = False  # an unfilled tail, as a fixed cache has
    allowed[:, 0] = True
    return [t.to(device, dtype) if t.is_floating_point() else t.to(device) for t in (query, keys, values, allowed)]


@pytest.mark.parametrize(
    ("batch", "heads", "kv_heads", "capacity", "size"),
    [(1, 4, 4, 40, 16), (2, 8, 2, 100, 32), (3, 7, 1, 64, 16), (2, 2, 2, 5, 16)],
)
def test_decode_attention_kernel_equals_the_reference(batch, heads, kv_heads, capacity, size):
    query, keys, values, allowed = _case(batch, heads, kv_heads, capacity, size)
    assert kernel.applies(query)
    scale = size**-0.5
    torch.testing.assert_close(
        kernel.kernel(query, keys, values, allowed, scale),
        kernel.reference(query, keys, values, allowed, scale),
        rtol=1e-5,
        atol=1e-5,
    )


def test_the_kernel_applies_to_one_query_of_a_head_size_that_is_a_power_of_two_from_16():
    assert kernel.applies(_case(1, 2, 2, 10, 16)[0]) and kernel.applies(_case(1, 2, 2, 10, 128)[0])
    assert not kernel.applies(_case(1, 2, 2, 10, 12)[0]) and not kernel.applies(_case(1, 2, 2, 10, 8)[0])
    assert not kernel.applies(torch.zeros(1, 2, 3, 16))  # three query positions


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the dispatcher takes the kernel (tests/test_gpu.py)")
def test_decode_attention_on_the_cpu_is_the_reference():
    query, keys, values, allowed = _case(2, 4, 2, 30, 16, device="cpu")
    assert torch.equal(
        kernel.decode_attention(query, keys, values, allowed, 0.3), kernel.reference(query, keys, values, allowed, 0.3)
    )
