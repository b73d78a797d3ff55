"""Chunked prefill on the CPU with tiny models: a prompt prefilled a chunk at a time gives the cache and first token
of one prefill, for every family and every method that cuts before the language model; the scheduler decodes the
running batch between two chunks of an arrival and answers each request as alone; methods that cut inside the
language model are refused before any work."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from conftest import CASE_IDS, CASES, INVARIANT_METHODS, METHODS, PRUNING, method_cases, model_and_processor

import mmtoken
from mmtoken.encoding import encode
from mmtoken.integrations import adapter_for
from mmtoken.methods.base import BEFORE_LLM
from mmtoken.staging import chunked as chunking
from mmtoken.staging.chunked import ChunkedLanguageModel
from mmtoken.staging.continuous import ChunkedScheduler
from mmtoken.staging.decoding import prefill, step
from mmtoken.staging.encoders import LocalEncoder
from mmtoken.staging.jobs import Job
from mmtoken.zoo.tiny import tiny_inputs

BEFORE = [name for name in INVARIANT_METHODS if METHODS[name].stage == BEFORE_LLM]
CHUNK = 7


UNPATCHED_CASES = [
    pytest.param(case, None, id=f"{case_id}-unpatched") for case, case_id in zip(CASES, CASE_IDS, strict=True)
]


@contextmanager
def _in_chunks(model) -> Iterator[ChunkedLanguageModel]:
    """`model`'s language model split into chunks of `CHUNK` tokens while open."""
    chunked = ChunkedLanguageModel(adapter_for(model).language_model, CHUNK)
    chunked.attach()
    try:
        yield chunked
    finally:
        chunked.detach()


def _prefilled_in_chunks(model, inputs: dict) -> tuple[object, int]:
    """`inputs` prefilled `CHUNK` tokens at a time, and how many turns it took after its first chunk."""
    with _in_chunks(model) as chunked:
        running, turns = chunked.in_chunks(lambda: prefill(model, inputs, encode(model, inputs))), 1
        while not running.advance():
            turns += 1
        return running.result(), turns


@pytest.mark.parametrize(("case", "method"), UNPATCHED_CASES + method_cases(BEFORE))
@torch.no_grad()
def test_a_prefill_in_chunks_gives_the_cache_and_tokens_of_one_prefill(case, method):
    family, video = case
    model, processor = model_and_processor(family)
    inputs = tiny_inputs(processor, family, video=video, rows=[0, 1], question_lengths=[3, 8])
    with mmtoken.patched(model, method, **PRUNING[method]) if method else torch.no_grad():
        whole = prefill(model, inputs, encode(model, inputs))
        chunked, turns = _prefilled_in_chunks(model, inputs)
        held = whole.rows.cache.layers[0].keys.shape[2]
        assert turns == math.ceil(held / CHUNK) - 1 > 0
        for ours, theirs in zip(chunked.rows.cache.layers, whole.rows.cache.layers, strict=True):
            torch.testing.assert_close(ours.keys, theirs.keys, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(ours.values, theirs.values, atol=1e-5, rtol=1e-4)
        for _ in range(3):
            assert torch.equal(chunked.tokens, whole.tokens)
            step(model, chunked)
            step(model, whole)


@torch.no_grad()
def test_a_prefill_told_not_to_split_runs_the_rest_of_its_prompt_at_once():
    model, processor = model_and_processor("llava")
    inputs = tiny_inputs(processor, "llava", video=False, rows=[0], question_lengths=[3])
    whole = prefill(model, inputs, encode(model, inputs))
    with _in_chunks(model) as chunked:
        alone = chunked.in_chunks(lambda: prefill(model, inputs, encode(model, inputs)), split=False)
        assert alone.advance()  # it had ended before the first turn: one call of the language model
        started = chunked.in_chunks(lambda: prefill(model, inputs, encode(model, inputs)))
        assert not started.advance() and started.advance(split=False)  # two chunks, then the rest at once
    for running in (alone, started):
        torch.testing.assert_close(running.result().rows.cache.layers[2].keys, whole.rows.cache.layers[2].keys,
                                   atol=1e-5, rtol=1e-4)  # fmt: skip
        assert torch.equal(running.result().tokens, whole.tokens)
    assert whole.rows.cache.get_seq_length() > 3 * CHUNK


@pytest.mark.parametrize(("family", "video", "method"), [("llava", False, None), ("qwen2_5_vl", True, "pooling")])
@torch.no_grad()
def test_the_running_batch_decodes_between_the_chunks_of_an_arrival(family, video, method):
    model, processor = model_and_processor(family)
    lengths, limits = (3, 9), (60, 4)
    rows = [tiny_inputs(processor, family, video=video, rows=[0], question_lengths=[length]) for length in lengths]
    with mmtoken.patched(model, method, **PRUNING[method]) if method else torch.no_grad():
        end = model.generation_config.eos_token_id
        model.generation_config.eos_token_id = None  # every request runs to its own limit
        try:
            expected = []
            for row, limit in zip(rows, limits, strict=True):
                out = model.generate(**row, max_new_tokens=limit, do_sample=False,
                                     pad_token_id=processor.tokenizer.pad_token_id)  # fmt: skip
                expected.append(out[0, row["input_ids"].shape[1] :].tolist())
            encoder = LocalEncoder(model, None, {}, False)
            scheduler = ChunkedScheduler(model, processor, encoder, max_batch=2, chunk_tokens=CHUNK).start()
            long = scheduler.submit(Job(dict(rows[0]), limits[0]))
            while len(long.tokens) < 2:
                time.sleep(0.001)
            late = scheduler.submit(Job(dict(rows[1]), limits[1]))
            answers = [long.future.result(timeout=120), late.future.result(timeout=120)]
            chunks = math.ceil(prefill(model, rows[1], encode(model, rows[1])).rows.cache.get_seq_length() / CHUNK)
            scheduler.close()
        finally:
            model.generation_config.eos_token_id = end
    assert answers == expected
    # between the late request's start and its first token, the long one got a token after each chunk but the last
    between = [at for at in long.token_times if late.started < at < late.token_times[0]]
    assert chunks > 1 and len(between) == chunks - 1
    assert model.model.language_model.__dict__.get("forward") is None  # closing gave the language model back


@torch.no_grad()
def test_a_request_alone_prefills_in_one_call_and_a_scheduler_never_started_closes(monkeypatch):
    model, processor = model_and_processor("llava")
    row = tiny_inputs(processor, "llava", video=False, rows=[0], question_lengths=[3])
    pauses = []
    real = chunking.InChunks.pause
    monkeypatch.setattr(chunking.InChunks, "pause", lambda self: (pauses.append(1), real(self))[1])
    encoder = LocalEncoder(model, None, {}, False)
    scheduler = ChunkedScheduler(model, processor, encoder, chunk_tokens=CHUNK).start()
    assert len(scheduler.submit(Job(dict(row), 3)).future.result(timeout=120)) == 3
    scheduler.close()
    assert pauses == []  # no row was decoding: one call of the language model
    language_model = adapter_for(model).language_model
    idle = ChunkedScheduler(model, processor, encoder, chunk_tokens=CHUNK)
    idle.close()
    assert "forward" not in language_model.__dict__
    wrapper = ChunkedLanguageModel(language_model, CHUNK)
    wrapper.attach()
    with pytest.raises(RuntimeError, match="attached already"):
        wrapper.attach()
    wrapper.detach()
    wrapper.detach()
    assert "forward" not in language_model.__dict__


@torch.no_grad()
def test_a_call_that_continues_a_cache_is_refused_in_chunks():
    """Chunks take a prompt's first call only: a mask sliced by the chunk's end would be wrong over a cache that
    already holds entries."""
    model, processor = model_and_processor("llava")
    inputs = tiny_inputs(processor, "llava", video=False, rows=[0], question_lengths=[3])
    decoding = prefill(model, inputs, encode(model, inputs))
    with _in_chunks(model) as chunked:
        running = chunked.in_chunks(lambda: step(model, decoding))
        assert running.advance()
    with pytest.raises(ValueError, match="a prompt's first call"):
        running.result()


@torch.no_grad()
def test_chunked_prefill_refuses_a_method_that_cuts_inside_the_language_model():
    model, processor = model_and_processor("llava")
    encoder = LocalEncoder(model, None, {}, False)
    with mmtoken.patched(model, "fastv", **PRUNING["fastv"]), pytest.raises(ValueError, match="fastv cuts"):
        ChunkedScheduler(model, processor, encoder)
    with pytest.raises(ValueError, match="chunk_tokens must be >= 1"):
        ChunkedScheduler(model, processor, encoder, chunk_tokens=0)
