"""Each Triton kernel equals its torch reference at small shapes: on a GPU where there is one, else on the CPU under
TRITON_INTERPRET=1 (conftest sets it where no GPU is); at real shapes in tests/test_gpu.py."""

from __future__ import annotations

import pytest
import torch

from mmtoken.kernels import decode_attention as kernel
from mmtoken.kernels import gather_rows, max_min, query_scores

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


@pytest.mark.parametrize(
    ("source_shape", "rows"),
    [((2, 1, 50, 40), 17), ((3, 4, 20, 16), 20), ((1, 2, 9, 130), 3)],
)
def test_gather_rows_kernel_equals_the_reference(source_shape, rows):
    generator = torch.Generator().manual_seed(1)
    source = torch.randn(*source_shape, generator=generator).to(DEVICE)
    index = torch.randint(0, source_shape[2], (source_shape[0], rows), generator=generator).to(DEVICE)
    assert torch.equal(gather_rows.kernel(source, index), gather_rows.reference(source, index))


def test_gather_rows_kernel_takes_a_source_broadcast_over_the_batch():
    source = torch.randn(1, 1, 12, 32).to(DEVICE)  # one table of rotary embeddings for every row
    index = torch.tensor([[0, 5, 11], [3, 3, 2]]).to(DEVICE)
    assert torch.equal(gather_rows.kernel(source, index), gather_rows.reference(source, index))


def _scores_case(batch, heads, kv_heads, length, size, seed=0):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, heads, size, generator=generator)
    keys = torch.randn(batch, length, kv_heads * size, generator=generator).view(batch, length, kv_heads, size)
    angles = torch.rand(batch, length, size // 2, generator=generator) * 6
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    valid = torch.rand(batch, length, generator=generator) < 0.8
    valid[:, -1] = True
    return [t.to(DEVICE) for t in (query, keys, cos, sin, valid)]


@pytest.mark.parametrize(
    ("batch", "heads", "kv_heads", "length", "size"),
    [(1, 4, 4, 70, 32), (2, 8, 2, 130, 64), (3, 3, 1, 5, 32)],
)
@pytest.mark.parametrize("rope", [True, False])
def test_query_scores_kernel_equals_the_reference(batch, heads, kv_heads, length, size, rope):
    query, keys, cos, sin, valid = _scores_case(batch, heads, kv_heads, length, size)
    if not rope:
        cos = sin = None
    assert query_scores.applies(query)
    result = query_scores.kernel(query, keys, cos, sin, valid, size**-0.5)
    torch.testing.assert_close(result, query_scores.reference(query, keys, cos, sin, valid, size**-0.5))
    assert (result[~valid] == 0).all()


def test_query_scores_kernel_applies_to_head_sizes_that_are_powers_of_two_from_32():
    assert query_scores.applies(torch.zeros(1, 2, 32)) and query_scores.applies(torch.zeros(1, 2, 128))
    assert not query_scores.applies(torch.zeros(1, 2, 16)) and not query_scores.applies(torch.zeros(1, 2, 48))


@pytest.mark.parametrize(("batch", "length", "count"), [(1, 9, 4), (3, 40, 12), (2, 130, 140)])
def test_max_min_kernel_equals_the_reference(batch, length, count):
    generator = torch.Generator().manual_seed(2)
    unit = torch.nn.functional.normalize(torch.randn(batch, length, 8, generator=generator), dim=-1)
    distance = (1 - unit @ unit.transpose(1, 2)).to(DEVICE)
    candidates = (torch.rand(batch, length, generator=generator) < 0.7).to(DEVICE)
    candidates[0] = False
    candidates[0, length // 2] = True  # one candidate: the row runs out after its first pick
    first = torch.where(candidates, torch.rand(batch, length).to(DEVICE), -1.0).argmax(1, keepdim=True)
    expected = max_min.reference(distance, candidates, first, count)
    assert torch.equal(max_min.kernel(distance, candidates, first, count), expected)
    assert (expected[0, 1:] == -1).all()
