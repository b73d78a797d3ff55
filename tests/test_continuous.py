"""Continuous batching on the CPU with tiny models: rows prefilled apart and joined into a decoding batch, rows
leaving it, answer as each request alone, for every family and every method; the scheduler that does it."""

from __future__ import annotations

import copy
import time
from functools import partial

import pytest
import torch
from conftest import CASES, INVARIANT_METHODS, METHODS, PRESSES, PRUNING, examples, model_and_processor

import mmtoken
from mmtoken.encoding import encode
from mmtoken.staging import continuous
from mmtoken.staging.continuous import BATCHING, ChunkedScheduler, ContinuousScheduler, OverlappedScheduler
from mmtoken.staging.decoding import joined, prefill, step
from mmtoken.staging.encoders import LocalEncoder
from mmtoken.staging.jobs import Job
from mmtoken.staging.scheduler import OutOfMemory
from mmtoken.zoo.tiny import tiny_inputs

NEW_TOKENS = 6
JOINABLE = [name for name in INVARIANT_METHODS + PRESSES if name != "h2o"]


def _alone(model, processor, inputs, tokens: int = NEW_TOKENS) -> list[int]:
    out = model.generate(**inputs, max_new_tokens=tokens, do_sample=False,
                         pad_token_id=processor.tokenizer.pad_token_id)  # fmt: skip
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def _params(method: str) -> dict:
    return PRUNING[method] if method in INVARIANT_METHODS else examples(method).cutting


def _cases() -> list:
    return [
        pytest.param(family, video, method, id=f"{family}-{'video' if video else 'image'}-{method}")
        for family, video in CASES
        for method in [None, *JOINABLE]
        if method is None or video or not METHODS[method].video_only
    ]


@pytest.mark.parametrize(("family", "video", "method"), _cases())
@torch.no_grad()
def test_rows_that_join_and_leave_a_decoding_batch_answer_as_each_alone(family, video, method):
    model, processor = model_and_processor(family)
    rows = [tiny_inputs(processor, family, video=video, rows=[0], question_lengths=[length]) for length in (3, 9, 5)]
    with mmtoken.patched(model, method, **_params(method)) if method else torch.no_grad():
        expected = [_alone(model, processor, row) for row in rows]
        got: list[list[int]] = [[], [], []]

        def prefilled(row: int):
            decoding = prefill(model, rows[row], encode(model, rows[row]))
            got[row].append(decoding.tokens[0].item())
            return decoding

        def decode(decoding, requests: list[int], steps: int) -> None:
            for _ in range(steps):
                step(model, decoding)
                for place, row in enumerate(requests):
                    got[row].append(decoding.tokens[place].item())

        first = prefilled(0)
        decode(first, [0], 1)
        both = joined([first, prefilled(1)], [[0], [0]])  # request 1 joins request 0 after its second token
        decode(both, [0, 1], 2)
        three = joined([both, prefilled(2)], [[0, 1], [0]])
        decode(three, [0, 1, 2], 1)
        decode(joined([three], [[1, 2]]), [1, 2], 3)  # request 0 has ended and leaves
    assert [len(tokens) for tokens in got] == [5, 7, 5]
    assert all(tokens[: len(alone)] == alone[: len(tokens)] for tokens, alone in zip(got, expected, strict=True))


@pytest.mark.parametrize("scheduling", [ContinuousScheduler, OverlappedScheduler])
@pytest.mark.parametrize(("family", "video", "method"), [("llava", False, None), ("qwen2_5_vl", True, "pooling")])
@torch.no_grad()
def test_the_scheduler_starts_a_request_while_another_decodes_and_answers_each_as_alone(family, video, method,
                                                                                        scheduling):  # fmt: skip
    model, processor = model_and_processor(family)
    lengths, limits = (3, 9, 5, 7), (48, 3, 5, 2)
    rows = [tiny_inputs(processor, family, video=video, rows=[0], question_lengths=[length]) for length in lengths]
    with mmtoken.patched(model, method, **_params(method)) if method else torch.no_grad():
        end = model.generation_config.eos_token_id
        model.generation_config.eos_token_id = None  # every request runs to its own limit
        try:
            expected = [_alone(model, processor, row, limit) for row, limit in zip(rows, limits, strict=True)]
            scheduler = scheduling(model, processor, LocalEncoder(model, None, {}, False), max_batch=2)
            scheduler.start()
            long = scheduler.submit(Job(dict(rows[0]), limits[0]))
            while len(long.tokens) < 2:
                time.sleep(0.001)
            late = [scheduler.submit(Job(dict(row), limit)) for row, limit in zip(rows[1:], limits[1:], strict=True)]
            answers = [job.future.result(timeout=120) for job in [long, *late]]
            scheduler.close()
        finally:
            model.generation_config.eos_token_id = end
    assert answers == expected
    # the first joined while the long request decoded (the others wait for its room, which takes as long as the
    # prefill thread takes on a busy CPU); a static batch would start it after the long request's end
    assert late[0].started < long.finished
    assert all(len(job.token_times) == len(job.tokens) for job in [long, *late])


@pytest.mark.parametrize("scheduling", [ContinuousScheduler, OverlappedScheduler, ChunkedScheduler,
                                        partial(ChunkedScheduler, chunk_tokens=7)],
                         ids=["continuous", "overlapped", "chunked", "chunked-7"])  # fmt: skip
@torch.no_grad()
def test_a_bad_request_among_good_ones_costs_only_itself_its_answer(scheduling):
    model, processor = model_and_processor("llava")
    rows = [tiny_inputs(processor, "llava", video=False, rows=[0], question_lengths=[length]) for length in (3, 5)]
    bad = dict(rows[0])
    bad["pixel_values"] = bad["pixel_values"][..., :-1]  # a wrong image size, which the vision tower refuses
    expected = [_alone(model, processor, row, 4) for row in rows]
    scheduler = scheduling(model, processor, LocalEncoder(model, None, {}, False), max_batch=4)
    jobs = [Job(dict(rows[0]), 4), Job(bad, 4), Job(dict(rows[1]), 4)]
    for job in jobs:
        scheduler.submit(job)
    scheduler.start()
    scheduler.close()
    assert [jobs[0].future.result(), jobs[2].future.result()] == expected
    assert jobs[1].future.exception() is not None


def test_continuous_batching_refuses_a_method_that_evicts_while_decoding():
    model, processor = model_and_processor("llava")
    with mmtoken.patched(model, "h2o", **examples("h2o").cutting), pytest.raises(ValueError, match="h2o"):
        ContinuousScheduler(model, processor, LocalEncoder(model, None, {}, False))


@torch.no_grad()
def test_rows_that_cannot_join_get_the_error_and_the_running_batch_goes_on(monkeypatch):
    model, processor = model_and_processor("llava")
    rows = [tiny_inputs(processor, "llava", video=False, rows=[0], question_lengths=[length]) for length in (3, 5)]
    end = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = None
    try:
        expected = _alone(model, processor, rows[0], 12)
        scheduler = ContinuousScheduler(model, processor, LocalEncoder(model, None, {}, False), max_batch=2)
        real = continuous.joined

        def out_of_memory_when_joining_two(parts, keep):  # what a join that needs more memory than is left does
            if len(parts) == 2:
                raise torch.OutOfMemoryError("CUDA out of memory (injected)")
            return real(parts, keep)

        monkeypatch.setattr(continuous, "joined", out_of_memory_when_joining_two)
        scheduler.start()
        first = scheduler.submit(Job(dict(rows[0]), 12))
        while len(first.tokens) < 2:
            time.sleep(0.001)
        second = scheduler.submit(Job(dict(rows[1]), 12))
        answer = first.future.result(timeout=120)
        scheduler.close()
    finally:
        model.generation_config.eos_token_id = end
    assert answer == expected
    assert isinstance(second.future.exception(), OutOfMemory) and len(second.tokens) == 1


def test_continuous_batching_refuses_a_model_with_sliding_window_layers():
    model, processor = model_and_processor("qwen2_vl")
    config = copy.deepcopy(model.config)
    text = config.get_text_config()
    text.use_sliding_window, text.sliding_window = True, 4
    text.layer_types = ["sliding_attention"] * text.num_hidden_layers
    sliding = type(model)(config).eval()
    with pytest.raises(ValueError, match="sliding-window"):
        ContinuousScheduler(sliding, processor, LocalEncoder(sliding, None, {}, False))


@pytest.mark.parametrize("setting", [True, False])
@pytest.mark.parametrize("batching", sorted(BATCHING))
@torch.no_grad()
def test_a_scheduler_runs_without_cudnn_attention_and_gives_the_setting_back(batching, setting):
    """cuDNN plans its attention anew for every key length (about 2.4 ms of host time a call on an H100), so the
    schedulers turn it off while they run and restore the caller's setting when they close."""
    model, processor = model_and_processor("llava")
    row = tiny_inputs(processor, "llava", video=False, rows=[0], question_lengths=[3])
    torch.backends.cuda.enable_cudnn_sdp(setting)
    try:
        scheduler = BATCHING[batching](model, processor, LocalEncoder(model, None, {}, False), max_batch=2).start()
        seen = []
        job = Job(dict(row), 3)
        job.on_token = lambda token: seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        scheduler.submit(job).future.result(timeout=120)
        scheduler.close()
        assert seen and not any(seen)
        assert torch.backends.cuda.cudnn_sdp_enabled() is setting
    finally:
        torch.backends.cuda.enable_cudnn_sdp(True)


def test_schedulers_that_overlap_give_the_setting_back_when_the_last_closes():
    model, processor = model_and_processor("llava")
    first, second = (ContinuousScheduler(model, processor, LocalEncoder(model, None, {}, False)) for _ in range(2))
    assert torch.backends.cuda.cudnn_sdp_enabled()
    first.start()
    second.start()
    first.close()
    assert not torch.backends.cuda.cudnn_sdp_enabled()  # the second still runs
    second.close()
    assert torch.backends.cuda.cudnn_sdp_enabled()
    with pytest.raises(RuntimeError, match="started already"):
        first.start()
    assert torch.backends.cuda.cudnn_sdp_enabled()


@pytest.mark.parametrize("limits", [(1, 3), (2, 4)], ids=["ends at its first token", "ends at a decode step"])
@torch.no_grad()
def test_a_request_whose_rows_cannot_be_kept_gets_the_error_and_the_scheduler_goes_on(monkeypatch, limits):
    """Two requests prefilled together, one ending first: keeping the other's row alone fails (out of memory, say);
    that request gets the error, and the scheduler goes on to answer the next one."""
    model, processor = model_and_processor("llava")
    row = tiny_inputs(processor, "llava", video=False, rows=[0], question_lengths=[3])
    expected = _alone(model, processor, row, 3)
    real = continuous.joined

    def out_of_memory_when_keeping_some_rows(parts, keep):
        if len(parts) == 1 and 0 < len(keep[0]) < parts[0].size:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(parts, keep)

    monkeypatch.setattr(continuous, "joined", out_of_memory_when_keeping_some_rows)
    end = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = None
    try:
        scheduler = ContinuousScheduler(model, processor, LocalEncoder(model, None, {}, False), max_batch=4)
        short, long = scheduler.submit(Job(dict(row), limits[0])), scheduler.submit(Job(dict(row), limits[1]))
        scheduler.start()
        assert short.future.result(timeout=120) == expected[: limits[0]]
        assert isinstance(long.future.exception(timeout=120), OutOfMemory)
        after = scheduler.submit(Job(dict(row), 3))
        assert after.future.result(timeout=120) == expected
        assert scheduler._thread.is_alive()
        scheduler.close()
    finally:
        model.generation_config.eos_token_id = end
