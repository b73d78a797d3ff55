"""GPU memory of long videos under KV presses, at LLaVA-OneVision-7B's or Qwen2.5-VL-7B's real sizes with random
weights.

Two measurements, each setting beside the unpatched model and beside the same press applied after a whole prefill
(kvpress's way) in one run, under a cap of 80 GiB of GPU memory, or the card's if smaller
(`torch.cuda.set_per_process_memory_fraction`):

- **length**: one request whose video has 32 to 10,000 frames: peak memory, time to first token and KV bytes;
- **concurrency**: the most 64-frame requests one batched `generate` fits (doubling the batch until it runs out of
  memory, then one step between), and the decode tokens/s at that batch.

The video's frames are a few real frames through the model's processor and vision tower (`--base-frames`), their
features repeated to the length asked (the language model's cost depends on the count of tokens only); so the
prefill runs on encoded features, whose bytes are part of the peak, as are the prompt's embeddings the model builds
from them, except in a streaming prefill, which embeds one chunk at a time. The encoder's own time per frame is
measured on the real frames. The last setting streams from the pixels instead (the real frames repeated): each
chunk's frames go through the vision tower as the chunk enters, so its time to first token holds the encoder's and
its peak holds no features beyond a chunk's (length only; its decode steps are the streamed setting's).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import time
import traceback
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from rich.progress import track
from transformers.modeling_outputs import BaseModelOutputWithPooling

import mmtoken
from mmtoken.accounting.stats import cache_bytes
from mmtoken.compat import cache_of
from mmtoken.encoding import Encoded, encode, feeding
from mmtoken.evaluation.speed import Shape, TokenClock, build_model, onevision_7b, prompt_inputs, qwen25vl_7b, timed
from mmtoken.state import VIDEO

CAP_GIB = 80
VIDEO_SHAPES = {"onevision-7b-video": onevision_7b, "qwen25vl-7b-video": partial(qwen25vl_7b, "video")}


@dataclass
class Setting:
    """The unpatched model (no method) or a press by name with its parameters; `encodes`: the prefill gets the
    video's pixels, not its features."""

    label: str
    method: str | None = None
    params: dict | None = None
    encodes: bool = False

    @property
    def streams(self) -> bool:
        return bool(self.params and self.params.get("chunk_frames"))


SKIPPABLE = ("after", "streamed", "encoded")  # the settings beside the unpatched model, which always runs


def settings(press: str, capacity: int, chunk_frames: int, skip: tuple[str, ...] = ()) -> list[Setting]:
    """Unpatched, `press` at `capacity` entries per layer after the prefill (`after`), and the same streamed in
    chunks, from encoded features (`streamed`) and from the pixels (`encoded`); those named in `skip` left out."""
    streamed = {"capacity": capacity, "chunk_frames": chunk_frames}
    pressed = {
        "after": Setting(f"{press} {capacity} after prefill", press, {"capacity": capacity}),
        "streamed": Setting(f"{press} {capacity} streamed, {chunk_frames}-frame chunks", press, streamed),
        "encoded": Setting(f"{press} {capacity} streamed, frames encoded per chunk", press, streamed, encodes=True),
    }
    return [Setting("unpatched"), *(setting for kind, setting in pressed.items() if kind not in skip)]


def lengthened(model: torch.nn.Module, inputs: dict, encoded: Encoded, frames: int, batch: int) -> tuple[dict, Encoded]:
    """`inputs` and `encoded` of a video of `frames` frames: the encoded frames repeated in order (frame i is base
    frame i mod base), the prompt's video tokens as many as they fill, for `batch` identical requests. The pixels
    stay a view of one frame (the model only counts them when it is fed features)."""
    if model.config.model_type.startswith("qwen2"):
        return _lengthened_qwen(model, inputs, encoded, frames, batch)
    pixels = inputs["pixel_values_videos"]
    base = pixels.shape[1]
    pooled = encoded.features[VIDEO].pooler_output  # (1, base frames x tokens [+ the newline, on newer releases])
    per_frame = pooled.shape[1] // base
    # one gather of every token (the frames', then those after them), so the long features are made once, not twice
    tokens = torch.arange(pooled.shape[1], device=pooled.device)
    frame_tokens = tokens[: base * per_frame].unflatten(0, (base, per_frame))
    repeated = frame_tokens[torch.arange(frames, device=pooled.device) % base].flatten()
    features = pooled[:, torch.cat([repeated, tokens[base * per_frame :]])].expand(batch, -1, -1)
    long_ids = _with_video_tokens(model, inputs["input_ids"][0], (frames - base) * per_frame)
    long_inputs = {"input_ids": long_ids.repeat(batch, 1),
                   "pixel_values_videos": pixels[:1, :1].expand(batch, frames, *pixels.shape[2:])}  # fmt: skip
    return long_inputs, Encoded({VIDEO: BaseModelOutputWithPooling(pooler_output=features)})


def _with_video_tokens(model: torch.nn.Module, ids: torch.Tensor, more: int) -> torch.Tensor:
    """The prompt `ids` with `more` video tokens after its last one."""
    end = int((ids == model.config.video_token_id).nonzero().flatten()[-1]) + 1
    return torch.cat([ids[:end], ids.new_full((more,), model.config.video_token_id), ids[end:]])


def _lengthened_qwen(model: torch.nn.Module, inputs: dict, encoded: Encoded, frames: int, batch: int):
    """`lengthened` for Qwen2-VL families, whose video is a grid of (frames / temporal patch) x rows x columns
    merged patches: the grid's time steps repeat, and the grid, the token types and the pixels say so."""
    step = model.config.vision_config.temporal_patch_size
    if frames % step:
        raise ValueError(f"a Qwen video has a multiple of {step} frames (its temporal patch), not {frames}")
    (base, rows, columns), merge = inputs["video_grid_thw"][0].tolist(), model.config.vision_config.spatial_merge_size
    per_step, steps = rows * columns // merge**2, frames // step
    pooled = encoded.features[VIDEO].pooler_output[0].unflatten(0, (base, per_step))
    features = pooled[torch.arange(steps, device=pooled.device) % base].flatten(0, 1)
    long_ids = _with_video_tokens(model, inputs["input_ids"][0], (steps - base) * per_step).repeat(batch, 1)
    types = inputs["mm_token_type_ids"][0]
    video_type = int(types[inputs["input_ids"][0] == model.config.video_token_id][0])
    long_inputs = {
        "input_ids": long_ids,
        "mm_token_type_ids": torch.where(long_ids == model.config.video_token_id, video_type, 0).to(types.dtype),
        "pixel_values_videos": inputs["pixel_values_videos"][:1].expand(batch, -1),
        "video_grid_thw": inputs["video_grid_thw"].new_tensor([[steps, rows, columns]]).repeat(batch, 1),
        "second_per_grid_ts": inputs["second_per_grid_ts"][:1].repeat(batch),
    }
    return long_inputs, Encoded({VIDEO: BaseModelOutputWithPooling(pooler_output=(features,) * batch)})


def with_pixels(model: torch.nn.Module, inputs: dict, long_inputs: dict) -> dict:
    """`long_inputs` (from `lengthened`) with pixels the vision tower encodes into the lengthened video: the base
    frames repeated in order (Qwen: its patches, in host memory as a long video's decoded frames would be, 12 GB at
    10,000 frames; the streaming prefill brings each chunk's to the GPU. OneVision keeps its view of the first
    frame, every frame alike)."""
    if not model.config.model_type.startswith("qwen2"):
        return long_inputs
    (base, rows, columns), steps = inputs["video_grid_thw"][0].tolist(), int(long_inputs["video_grid_thw"][0, 0])
    patches = inputs["pixel_values_videos"].cpu().unflatten(0, (base, rows * columns))
    pixels = patches[torch.arange(steps) % base].flatten(0, 1)
    return long_inputs | {"pixel_values_videos": pixels.pin_memory() if torch.cuda.is_available() else pixels}


def _generate(model: torch.nn.Module, inputs: dict, encoded: Encoded | None, new_tokens: int, device: str) -> dict:
    """TTFT, decode tokens/s, peak memory (None off the GPU) and KV bytes of one greedy generation on `encoded`
    features (None: the model encodes the pixels of `inputs`)."""
    gpu = device.startswith("cuda")
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    clock = TokenClock(device)
    started = time.perf_counter()
    with nullcontext() if encoded is None else feeding(model, encoded):
        out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             streamer=clock, return_dict_in_generate=True)  # fmt: skip
    batch = inputs["input_ids"].shape[0]
    return {
        "ttft_ms": 1000 * (clock.times[0] - started),
        "decode_tokens_per_s": batch * (len(clock.times) - 1) / (clock.times[-1] - clock.times[0]),
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if gpu else None,
        "peak_reserved_bytes": torch.cuda.max_memory_reserved() if gpu else None,  # above the peak: fragmentation
        "kv_bytes": cache_bytes(cache_of(out)),
    }


def attempt(model: torch.nn.Module, setting: Setting, run: partial) -> dict:
    """`run()` under `setting`, or {"out_of_memory": True} where it ran past the cap, with the peaks allocated and
    reserved when it failed (a reserve far above what was allocated is fragmentation, not a full card); either way
    with the bytes allocated before it started (what an earlier run left would show there)."""
    gc.collect()
    torch.cuda.empty_cache()
    before = {"allocated_before_bytes": torch.cuda.memory_allocated() if torch.cuda.is_available() else None}
    try:
        if setting.method is None:
            return before | run()
        with mmtoken.patched(model, setting.method, **setting.params):
            return before | run()
    except torch.OutOfMemoryError as error:  # the memory goes back once the error and its frames are gone
        failed = {"out_of_memory": True, "failed_allocation": _failed_allocation(error)}
    if torch.cuda.is_available():
        failed |= {"failed_at_allocated_bytes": torch.cuda.max_memory_allocated(),
                   "failed_at_reserved_bytes": torch.cuda.max_memory_reserved()}  # fmt: skip
    return before | failed


def _failed_allocation(error: torch.OutOfMemoryError) -> str:
    """How much the failing allocation asked for, as the error says it, and the innermost Python line that asked."""
    asked = re.search(r"Tried to allocate [\d.]+ [KMGT]?i?B", str(error))
    frame = traceback.extract_tb(error.__traceback__)[-1]
    where = f"{Path(frame.filename).name}:{frame.lineno} {frame.name}"
    return f"{asked.group(0) if asked else str(error)[:80]} in {where}"


def full_kv_bytes(model: torch.nn.Module, tokens: int) -> int:
    """Bytes of the KV cache of `tokens` prompt tokens, every layer whole (bf16)."""
    text = model.config.text_config
    head = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return 2 * text.num_hidden_layers * text.num_key_value_heads * head * tokens * 2


@torch.no_grad()
def measure_length(
    model: torch.nn.Module,
    inputs: dict,
    encoded: Encoded,
    grid: list[Setting],
    frames: list[int],
    streamed_only: list[int],
    device: str = "cuda",
) -> list[dict]:
    """A row per setting and frame count: peak memory, TTFT and KV bytes of one request (2 new tokens). Settings
    that prefill the whole video skip the `streamed_only` counts and every count whose whole KV cache alone is
    past the cap; those that encode the pixels run once the long features are gone."""
    rows = []
    for count in track(sorted({*frames, *streamed_only}), description="length"):
        long_inputs, long_encoded = lengthened(model, inputs, encoded, count, 1)
        tokens = long_inputs["input_ids"].shape[1]
        for setting in sorted(grid, key=lambda setting: setting.encodes):
            if setting.encodes and long_encoded is not None:
                long_inputs, long_encoded = with_pixels(model, inputs, long_inputs), None
            row = {"measurement": "length", "setting": setting.label, "frames": count, "prompt_tokens": tokens}
            whole = full_kv_bytes(model, tokens)
            if not setting.streams and whole > CAP_GIB * 2**30:
                rows.append(row | {"skipped": f"the whole prefill's KV alone needs {whole / 2**30:.0f} GiB"})
                continue
            if not setting.streams and count not in frames:
                rows.append(row | {"skipped": "whole prefills of this length are not asked for (--frames)"})
                continue
            rows.append(row | attempt(model, setting, partial(_generate, model, long_inputs, long_encoded, 2, device)))
        del long_inputs, long_encoded
    return rows


@torch.no_grad()
def measure_concurrency(
    model: torch.nn.Module,
    inputs: dict,
    encoded: Encoded,
    grid: list[Setting],
    frames: int,
    new_tokens: int,
    max_batch: int,
    device: str = "cuda",
) -> list[dict]:
    """Per setting, the largest batch of `frames`-frame requests up to `max_batch` that fits (doubling, then one
    step between the last that ran and the first that did not), with its decode tokens/s; every batch tried is a
    row."""
    rows = []
    for setting in track([setting for setting in grid if not setting.encodes], description="concurrency"):
        batch, fits, fails = 1, None, None
        while True:
            long_inputs, long_encoded = lengthened(model, inputs, encoded, frames, batch)
            result = attempt(model, setting, partial(_generate, model, long_inputs, long_encoded, new_tokens, device))
            del long_inputs, long_encoded
            rows.append({"measurement": "concurrency", "setting": setting.label, "frames": frames, "batch": batch}
                        | result)  # fmt: skip
            if result.get("out_of_memory"):
                fails = batch
            else:
                fits = batch
            if fails is None:
                if batch >= max_batch:
                    break
                batch = min(2 * batch, max_batch)
            elif fits is not None and fails - fits > 1 and fails == 2 * fits:
                batch = (fits + fails) // 2
            else:
                break
    return rows


def summary(rows: list[dict]) -> list[dict]:
    """Per setting: the largest batch that ran at the concurrency length, its decode tokens/s, and both as ratios
    to the unpatched model's."""
    best: dict[str, dict] = {}
    for row in rows:
        ran = row["measurement"] == "concurrency" and not row.get("out_of_memory")
        if ran and (row["setting"] not in best or row["batch"] > best[row["setting"]]["batch"]):
            best[row["setting"]] = row
    base = next(iter(best.values()), None)
    return [
        {"setting": label, "batch": row["batch"], "decode_tokens_per_s": row["decode_tokens_per_s"],
         "batch_ratio": row["batch"] / base["batch"],
         "decode_ratio": row["decode_tokens_per_s"] / base["decode_tokens_per_s"]}
        for label, row in best.items()
    ]  # fmt: skip


def growth(rows: list[dict]) -> dict[str, float]:
    """Per setting with two or more lengths that ran: the bytes the prefill adds to what was allocated before it, per
    prompt token, from its shortest run to its longest (0 for memory flat in the video's length)."""
    added: dict[str, list[tuple[int, int]]] = {}
    for row in rows:
        if row["measurement"] == "length" and row.get("peak_memory_bytes") is not None:
            extra = row["peak_memory_bytes"] - row["allocated_before_bytes"]
            added.setdefault(row["setting"], []).append((row["prompt_tokens"], extra))
    return {
        label: (max(points)[1] - min(points)[1]) / (max(points)[0] - min(points)[0])
        for label, points in added.items()
        if len(points) > 1
    }


def _gib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**30:.2f} GiB"


def _cell(row: dict) -> str:
    if "skipped" in row:
        return f"not run: {row['skipped']}"
    if row.get("out_of_memory"):
        return _out_of_memory(row)
    return f"{_gib(row['peak_memory_bytes'])}, {row['ttft_ms'] / 1000:.2f} s, KV {_gib(row['kv_bytes'])}"


def _out_of_memory(row: dict) -> str:
    """Where a run ran out of memory: what was allocated and reserved at the failure, where that was recorded."""
    asked = f" ({row['failed_allocation']})" if row.get("failed_allocation") else ""
    if row.get("failed_at_allocated_bytes") is None:
        return "out of memory" + asked
    return (f"out of memory at {_gib(row['failed_at_allocated_bytes'])} allocated, "
            f"{_gib(row['failed_at_reserved_bytes'])} reserved{asked}")  # fmt: skip


def _tried(row: dict) -> str:
    """A concurrency batch's peak allocated and reserved, or where it ran out of memory."""
    if row.get("out_of_memory"):
        return _out_of_memory(row)
    reserved = row.get("peak_reserved_bytes")
    return _gib(row["peak_memory_bytes"]) + ("" if reserved is None else f" (reserved {_gib(reserved)})")


def markdown(rows: list[dict], environment: dict) -> str:
    """Tables of the length and concurrency rows."""
    length = [row for row in rows if row["measurement"] == "length"]
    labels = list(dict.fromkeys(row["setting"] for row in length))
    lines = ["| frames (prompt tokens) | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for count in dict.fromkeys(row["frames"] for row in length):
        cells = {row["setting"]: row for row in length if row["frames"] == count}
        first = next(iter(cells.values()))
        lines.append(f"| {count} ({first['prompt_tokens']:,}) | " + " | ".join(_cell(cells[label]) for label in labels)
                     + " |")  # fmt: skip
    lines += ["", "Peak memory above what was allocated before the prefill, per prompt token, shortest run to longest: "
              + ("; ".join(f"{label}: {per_token / 1000:.1f} KB" for label, per_token in growth(rows).items())
                 or "fewer than two lengths ran")]  # fmt: skip
    lines += ["", "| setting | largest batch that fits | decode tokens/s | batch ratio | decode ratio |",
              "|---|---|---|---|---|"]  # fmt: skip
    for row in summary(rows):
        lines.append(f"| {row['setting']} | {row['batch']} | {row['decode_tokens_per_s']:.0f} | "
                     f"{row['batch_ratio']:.2f}x | {row['decode_ratio']:.2f}x |")  # fmt: skip
    tried = [row for row in rows if row["measurement"] == "concurrency"]
    lines += ["", "Batches tried: " + "; ".join(
        f"{row['setting']} x{row['batch']}: " + _tried(row)
        for row in tried)]  # fmt: skip
    return f"Environment: {json.dumps(environment)}\n\nPeak memory, TTFT, KV after prefill:\n\n" + "\n".join(lines)


def plot(rows: list[dict], cap_gib: float, path: Path) -> None:
    """Peak memory against the video's frames, a line per setting (points that ran out of memory left out)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(6, 4))
    length = [row for row in rows if row["measurement"] == "length" and "peak_memory_bytes" in row]
    for label in dict.fromkeys(row["setting"] for row in length):
        points = [(row["frames"], row["peak_memory_bytes"] / 2**30) for row in length if row["setting"] == label]
        axes.plot(*zip(*points, strict=True), marker="o", label=label)
    axes.axhline(cap_gib, color="grey", linestyle="--", label=f"{cap_gib:.0f} GiB cap")
    axes.set(xscale="log", xlabel="video frames", ylabel="peak GPU memory (GiB)")
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmtoken kvbench", description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=list(VIDEO_SHAPES), default="onevision-7b-video")
    parser.add_argument("--frames", type=int, nargs="+", default=[32, 128, 512], help="lengths every setting runs")
    parser.add_argument("--streamed-frames", type=int, nargs="*", default=[2000, 10000],
                        help="lengths only the streamed press runs (whole prefills of them take minutes)")  # fmt: skip
    parser.add_argument("--press", default="snapkv")
    parser.add_argument("--capacity", type=int, default=3136, help="KV entries per layer (16 frames of 196 tokens)")
    parser.add_argument("--chunk-frames", type=int, default=4)
    parser.add_argument("--concurrency-frames", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens generated per request at concurrency")
    parser.add_argument("--max-batch", type=int, default=512, help="the largest batch the concurrency tries")
    parser.add_argument("--base-frames", type=int, default=16, help="real frames encoded, repeated to each length")
    parser.add_argument("--attention", default="sdpa")
    parser.add_argument("--skip", nargs="+", choices=SKIPPABLE, default=[],
                        help="settings left out (the unpatched model always runs, the ratios are to it)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("results/kv-memory"))
    return parser


def run(shape: Shape, model: torch.nn.Module, args: argparse.Namespace) -> list[dict]:
    """Every row of both measurements for `model` on `shape`'s real frames."""
    inputs = prompt_inputs(shape, 1, "cuda", torch.bfloat16)
    encode(model, inputs)  # warm-up
    encoder_ms, encoded = timed(partial(encode, model, inputs), "cuda")
    grid = settings(args.press, args.capacity, args.chunk_frames, tuple(args.skip))
    rows = [{"measurement": "encoder", "frames": args.base_frames, "ms_per_frame": encoder_ms / args.base_frames}]
    rows += measure_length(model, inputs, encoded, grid, args.frames, args.streamed_frames)
    rows += measure_concurrency(model, inputs, encoded, grid, args.concurrency_frames, args.new_tokens, args.max_batch)
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("mmtoken kvbench measures GPU memory and needs a CUDA device")
    total = torch.cuda.get_device_properties(0).total_memory
    cap = min(CAP_GIB * 2**30, total)  # an 80 GB card holds a little less than 80 GiB
    torch.cuda.set_per_process_memory_fraction(cap / total)
    shape = VIDEO_SHAPES[args.shape](frames=args.base_frames)
    model = build_model(shape, args.attention, "cuda", torch.bfloat16)
    rows = run(shape, model, args)
    environment = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "allocator": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
                   "transformers": __import__("transformers").__version__, "shape": shape.name,
                   "attention": args.attention, "cap_gib": round(cap / 2**30, 2),
                   **vars(args) | {"out": str(args.out)}}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kv-memory.json").write_text(json.dumps({"environment": environment, "rows": rows}, indent=1))
    table = markdown(rows, environment)
    (args.out / "kv-memory.md").write_text(table + "\n")
    plot(rows, environment["cap_gib"], args.out / "kv-memory.png")
    print(table)
