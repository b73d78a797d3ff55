"""What one prefill and one decode step of a serving model cost, eager, with and without cuDNN's attention: a
4-image prompt's encoding, its prefill whole and in chunks of 512 and 2,048 tokens (each turn of the chunked
scheduler timed), a decode step of 1 and 8 rows of it, and under torch.profiler the host and device time of a
decode step's attention calls. What the serving tables' TPOT is made of.

    python3 scripts/step_costs.py random:onevision-7b-video
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from mmtoken.encoding import encode
from mmtoken.evaluation.serving import load_model, media_size
from mmtoken.integrations import adapter_for
from mmtoken.staging.chunked import ChunkedLanguageModel
from mmtoken.staging.decoding import joined, prefill, step
from mmtoken.staging.encoders import on_model
from mmtoken.staging.load import TraceRow, prompt_inputs


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def since(start: float) -> float:
    """Milliseconds from `start` (a `time.perf_counter()`) to when the device has done what was queued."""
    synchronize()
    return 1000 * (time.perf_counter() - start)


def milliseconds(run: Callable[[], object]) -> float:
    synchronize()
    start = time.perf_counter()
    run()
    return since(start)


def chunk_turns(model: torch.nn.Module, inputs: dict, encoded: object, size: int) -> list[float]:
    """The milliseconds of each turn of a prefill in chunks of `size` tokens (the first holds the first chunk)."""
    chunked = ChunkedLanguageModel(adapter_for(model).language_model, size)
    chunked.attach()
    try:
        synchronize()
        start = time.perf_counter()
        running = chunked.in_chunks(lambda: prefill(model, inputs, encoded))
        turns = [since(start)]
        ended = False
        while not ended:
            start = time.perf_counter()
            ended = running.advance()
            turns.append(since(start))
        return turns
    finally:
        chunked.detach()


def attention_times(model: torch.nn.Module, decoding: object) -> str:
    """The host and device microseconds per sdpa call of three decode steps, under torch.profiler."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as profiled:
        for _ in range(3):
            step(model, decoding)
        synchronize()
    (sdpa,) = [event for event in profiled.key_averages() if event.key == "aten::scaled_dot_product_attention"]
    return (f"{sdpa.count} sdpa calls, {sdpa.cpu_time_total / sdpa.count:.0f} us of host time and "
            f"{sdpa.device_time_total / sdpa.count:.1f} us on the device each")  # fmt: skip


def main(name: str) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, processor = load_model(name, device)
    inputs = prompt_inputs(processor, TraceRow(0.0, "images", 4, 0, 32), media_size(processor))
    inputs = on_model(model, inputs)
    length = inputs["input_ids"].shape[1]
    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"{name}, a 4-image prompt of {length} tokens, {card}, torch {torch.__version__}")
    encoded = encode(model, inputs)
    print(f"encode: {milliseconds(lambda: encode(model, inputs)):.1f} ms")
    for cudnn in (True, False):
        torch.backends.cuda.enable_cudnn_sdp(cudnn)
        label = "with cuDNN attention" if cudnn else "without cuDNN attention"
        prefill(model, inputs, encoded)
        print(f"{label}: whole prefill {milliseconds(lambda: prefill(model, inputs, encoded)):.1f} ms")
        for size in (512, 2048):
            chunk_turns(model, inputs, encoded, size)
            turns = chunk_turns(model, inputs, encoded, size)
            print(f"{label}: chunks of {size}, {len(turns)} turns, {sum(turns):.1f} ms "
                  f"({', '.join(f'{turn:.1f}' for turn in turns)})")  # fmt: skip
        for rows in (1, 8):
            decoding = joined([prefill(model, inputs, encoded)] * rows, [[0]] * rows)
            for _ in range(3):
                step(model, decoding)
            steps = sorted(milliseconds(lambda decoding=decoding: step(model, decoding)) for _ in range(9))
            print(f"{label}: decode step of {rows} rows, median {steps[4]:.1f} ms; "
                  f"{attention_times(model, decoding)}")  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1])
