"""The stages on the CPU with tiny models: batched requests answer as each alone, the embedding cache, a bad
request among good ones, a full queue."""

from __future__ import annotations

import pytest
import torch
from conftest import model_and_processor

import mmtoken
from mmtoken.encoding import encode
from mmtoken.staging.continuous import ContinuousScheduler, OverlappedScheduler
from mmtoken.staging.embedding_cache import EmbeddingCache, encoded_bytes, media_key
from mmtoken.staging.encoders import LocalEncoder, ThreadEncoder
from mmtoken.staging.jobs import Job
from mmtoken.staging.scheduler import Overloaded, Scheduler
from mmtoken.zoo.tiny import tiny_inputs

NEW_TOKENS = 5


def _alone(model, processor, inputs) -> list[int]:
    """The greedy tokens of one request by itself, up to its end of sequence."""
    out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False,
                         pad_token_id=processor.tokenizer.pad_token_id)[0, inputs["input_ids"].shape[1]:]  # fmt: skip
    end = model.generation_config.eos_token_id
    ends = set(end if isinstance(end, list) else [end])
    tokens = out.tolist()
    return next((tokens[:index] for index, token in enumerate(tokens) if token in ends), tokens)


def _run(scheduler: Scheduler, jobs: list[Job]) -> list[list[int]]:
    for job in jobs:
        scheduler.submit(job)
    scheduler.start()
    try:
        return [job.future.result(timeout=120) for job in jobs]
    finally:
        scheduler.close()


@pytest.mark.parametrize("family, video", [("llava", False), ("qwen2_5_vl", True)])
@pytest.mark.parametrize("method", [None, "fastv"])
@pytest.mark.parametrize("encoder", [LocalEncoder, ThreadEncoder])
@torch.no_grad()
def test_requests_batched_together_answer_as_each_alone(family, video, method, encoder):
    model, processor = model_and_processor(family)
    rows = [tiny_inputs(processor, family, video=video, rows=[0], question_lengths=[length]) for length in (3, 9, 5)]
    with mmtoken.patched(model, method, ratio=0.5) if method else torch.no_grad():
        expected = [_alone(model, processor, row) for row in rows]
        encoding = encoder(model, None, {}, False)
        scheduler = Scheduler(model, processor, encoding, max_batch=3)
        jobs = [Job(dict(row), NEW_TOKENS) for row in rows]
        assert _run(scheduler, jobs) == expected
        if encoder is ThreadEncoder:
            encoding.close()
    assert len({job.started for job in jobs}) == 1  # one batch
    assert all(len(job.token_times) == len(job.tokens) for job in jobs)


@torch.no_grad()
def test_the_embedding_cache_encodes_repeated_media_once_and_evicts_the_oldest():
    model, processor = model_and_processor("llava")
    first, second = (tiny_inputs(processor, "llava", rows=[row]) for row in (0, 1))
    assert media_key(first, {}) != media_key(second, {}) != media_key(second, {"size": 1})
    assert media_key(first, {}) == media_key(tiny_inputs(processor, "llava", rows=[0], question_lengths=[9]), {})
    size = encoded_bytes(encode(model, first))
    cache = EmbeddingCache(max_bytes=size)
    encoder = LocalEncoder(model, cache, {}, False)
    again = encoder.features(Job(dict(first), 1)), encoder.features(Job(dict(first), 1))
    assert (cache.hits, cache.misses) == (1, 1) and again[0] is again[1]
    encoder.features(Job(dict(second), 1))  # no room for both: the first leaves
    assert len(cache) == 1 and cache.bytes == size
    encoder.features(Job(dict(first), 1))
    assert (cache.hits, cache.misses) == (1, 3)


@pytest.mark.parametrize("scheduling", [Scheduler, ContinuousScheduler, OverlappedScheduler])
@pytest.mark.parametrize("encoder", [LocalEncoder, ThreadEncoder])
@torch.no_grad()
def test_a_bad_request_in_a_batch_costs_only_itself_its_answer(scheduling, encoder):
    """The batch fails, each request runs again alone with the encoding it got (a thread encoder hands each out
    once), and the bad one gets its own error."""
    model, processor = model_and_processor("llava")
    good = [tiny_inputs(processor, "llava", rows=[0], question_lengths=[length]) for length in (3, 6)]
    bad = dict(good[0])
    bad["input_ids"] = bad["input_ids"].clone()
    bad["input_ids"][0, -3:] = model.config.image_token_id  # more image tokens than its image fills
    expected = [_alone(model, processor, row) for row in good]
    encoding = encoder(model, None, {}, False)
    scheduler = scheduling(model, processor, encoding, max_batch=3)
    jobs = [Job(dict(good[0]), NEW_TOKENS), Job(bad, NEW_TOKENS), Job(dict(good[1]), NEW_TOKENS)]
    for job in jobs:
        scheduler.submit(job)
    scheduler.start()
    scheduler.close()
    if encoder is ThreadEncoder:
        encoding.close()
    assert [jobs[0].future.result(), jobs[2].future.result()] == expected
    with pytest.raises(ValueError, match="image tokens"):
        jobs[1].future.result()
    assert all(job.encoding is None for job in jobs)  # none holds its features once answered


def test_a_full_queue_refuses_before_any_work():
    model, processor = model_and_processor("llava")
    scheduler = Scheduler(model, processor, LocalEncoder(model, None, {}, False), max_waiting=1)
    scheduler.submit(Job(dict(tiny_inputs(processor, "llava", rows=[0])), 1))
    with pytest.raises(Overloaded, match="1 requests are waiting"):
        scheduler.submit(Job(dict(tiny_inputs(processor, "llava", rows=[0])), 1))
    scheduler.start()
    scheduler.close()
