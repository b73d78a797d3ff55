"""GPU speed of patched against unpatched models at real sizes, with random weights.

Shapes: LLaVA-1.5-7B with one image, LLaVA-OneVision-7B with a 32-frame video, Qwen2.5-VL-7B with one 1344 x 1344
image and with a 32-frame video. Inputs come from the families' real processor classes at the checkpoints' input
sizes (with a word-level tokenizer: token ids are all the speed depends on). For each shape, batch size and
setting (unpatched, keep-all, method x budget) it measures: the vision encoder (unpatched, or under the patch for
methods that read its attention, VisionZip and HoliTom, and for settings with CUDA graphs), the prefill on encoded
features (the model's forward with its vision encoder answering from a cache), and a `generate()` of 32 new tokens
from pixels, which gives time to first token (TTFT), time per output token (TPOT), peak memory and the KV cache's
bytes. Times are medians of
repeated runs after warm-up (CUDA events for encoder and prefill); settings are timed in turn, round after round,
so drift hits them all alike (a prefill speedup is the median of each round's ratio to the unpatched run of that
round). Every number is also a ratio against the unpatched model of the same run, next to the ceiling the FLOPs
cut would allow.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.progress import track
from transformers import (
    AutoModelForImageTextToText,
    CLIPImageProcessor,
    DynamicCache,
    LlavaConfig,
    LlavaOnevisionConfig,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
    LlavaProcessor,
    PretrainedConfig,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)
from transformers.generation.streamers import BaseStreamer

import mmtoken
from mmtoken.accounting.stats import cache_bytes
from mmtoken.compat import cache_of, with_cache
from mmtoken.encoding import Encoded, encode, feeding
from mmtoken.zoo.text import LLAVA_TEMPLATE, chatml_template, llama_tokenizer, qwen_tokenizer

SENTENCE = "describe what happens in this picture and name every object you can see with its color and place"
WORDS = SENTENCE.split(" ")
QUESTION = " ".join(WORDS + WORDS[:10])  # 28 words, as a benchmark question with its answer instructions

NEW_TOKENS = 32
FRACTIONS = (1 / 3, 2 / 9, 1 / 9)  # 192 / 128 / 64 of LLaVA-1.5's 576 visual tokens, the papers' budgets
QWEN_VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>")
_QWEN2_7B_TEXT = {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
                  "num_key_value_heads": 4, "vocab_size": 152064, "max_position_embeddings": 32768,
                  "rope_theta": 1_000_000.0}  # fmt: skip


def questions(count: int) -> list[str]:
    """`count` questions: QUESTION, then ones 5, 10, ... words longer, as requests that ask other things."""
    return [" ".join((WORDS * 8)[: len(QUESTION.split(" ")) + 5 * extra]) for extra in range(count)]


@dataclass
class Shape:
    """A model config and processor at a checkpoint's sizes, and the media of one prompt."""

    name: str
    config: PretrainedConfig
    processor: ProcessorMixin
    media: str  # "image" or "video"
    frames: list[Image.Image]  # one image, or a video's frames


def _frames(count: int, size: tuple[int, int]) -> list[Image.Image]:
    generator = np.random.default_rng(0)
    return [Image.fromarray(generator.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(count)]


def _token_ids(tokenizer, names: dict[str, str]) -> dict[str, int]:
    return {key: tokenizer.convert_tokens_to_ids(token) for key, token in names.items()}


def llava15_7b() -> Shape:
    tokenizer = llama_tokenizer(WORDS)
    config = LlavaConfig(
        vision_config={"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
                       "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336, "patch_size": 14,
                       "projection_dim": 768},
        text_config={"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32064,
                     "max_position_embeddings": 4096, "pad_token_id": tokenizer.pad_token_id},
        image_token_index=tokenizer.image_token_id, vision_feature_layer=-2, vision_feature_select_strategy="default",
    )  # fmt: skip
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}),
        tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=LLAVA_TEMPLATE,
    )  # fmt: skip
    return Shape("LLaVA-1.5-7B, 1 image 336 px", config, processor, "image", _frames(1, (336, 336)))


def onevision_7b(frames: int = 32) -> Shape:
    tokenizer = qwen_tokenizer(WORDS, "<image>", "<video>")
    config = LlavaOnevisionConfig(
        vision_config={"model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
                       "num_hidden_layers": 26, "num_attention_heads": 16, "image_size": 384, "patch_size": 14,
                       "vision_use_head": False},
        text_config={"model_type": "qwen2", **_QWEN2_7B_TEXT, "pad_token_id": tokenizer.pad_token_id},
        image_token_index=tokenizer.image_token_id, video_token_index=tokenizer.video_token_id,
        vision_feature_select_strategy="full", vision_feature_layer=-1, vision_aspect_ratio="anyres_max_9",
    )  # fmt: skip
    size = {"height": 384, "width": 384}
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=size),
        video_processor=LlavaOnevisionVideoProcessor(size=size),
        tokenizer=tokenizer, num_image_tokens=729, vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9", chat_template=chatml_template("<image>", "<video>"),
    )  # fmt: skip
    return Shape(f"LLaVA-OneVision-7B, {frames} frames 384 px", config, processor, "video", _frames(frames, (384, 384)))


def qwen25vl_7b(media: str, frames: int = 32) -> Shape:
    tokenizer = qwen_tokenizer(WORDS, "<|image_pad|>", "<|video_pad|>", extra=QWEN_VISION_TOKENS)
    ids = _token_ids(tokenizer, {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
                                 "vision_start_token_id": QWEN_VISION_TOKENS[0],
                                 "vision_end_token_id": QWEN_VISION_TOKENS[1]})  # fmt: skip
    rope = {"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1_000_000.0}
    text = {key: value for key, value in _QWEN2_7B_TEXT.items() if key != "rope_theta"}
    config = Qwen2_5_VLConfig(
        text_config={**text, "rope_parameters": rope, "pad_token_id": tokenizer.pad_token_id},
        vision_config={"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                       "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
                       "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
                       "hidden_act": "silu"},
        **ids,
    )  # fmt: skip
    patches = {"patch_size": 14, "temporal_patch_size": 2, "merge_size": 2}
    pixels = {"shortest_edge": 56 * 56, "longest_edge": 1344 * 1344}
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=pixels, **patches),
        video_processor=Qwen2VLVideoProcessor(size=pixels, cap_pixels_per_frame=True, **patches),
        tokenizer=tokenizer,
        chat_template=chatml_template("<|vision_start|><|image_pad|><|vision_end|>",
                                      "<|vision_start|><|video_pad|><|vision_end|>"),
    )  # fmt: skip
    if media == "image":
        return Shape("Qwen2.5-VL-7B, 1 image 1344 px", config, processor, "image", _frames(1, (1344, 1344)))
    return Shape(f"Qwen2.5-VL-7B, {frames} frames 448 px", config, processor, "video", _frames(frames, (448, 448)))


SHAPES: dict[str, Callable[[], Shape]] = {
    "llava15-7b": llava15_7b,
    "onevision-7b-video": onevision_7b,
    "qwen25vl-7b-image": partial(qwen25vl_7b, "image"),
    "qwen25vl-7b-video": partial(qwen25vl_7b, "video"),
}


@dataclass
class Setting:
    """One patched configuration: a label, a method name and its parameters (None: the unpatched model)."""

    label: str
    method: str | None = None
    params: dict | None = None
    cuda_graphs: bool = False


def settings(
    depth: int, visual: int, methods: list[str], fractions: tuple[float, ...] = FRACTIONS, graphs: bool = False
) -> list[Setting]:
    """Unpatched, keep-all (the hooks' own cost), then each method at each budget (a fraction of `visual`); with
    `graphs`, each of those again with CUDA graphs (decode steps and vision tower; keep-all's twin is the unpatched
    model graphed)."""
    pdrop_layers = tuple(sorted({2, depth // 4, depth // 2}))  # 2 / 8 / 16 on 32 layers
    params = {"fastv": {"k": 2}, "pdrop": {"layers": pdrop_layers}}
    rows = [Setting("unpatched"), Setting("keep-all (hook cost)", "fastv", {"k": 2, "ratio": 1.0})]
    for fraction in fractions:
        budget = round(visual * fraction)
        for method in methods:
            layers = "/".join(map(str, pdrop_layers)) if method == "pdrop" else "K=2" if method == "fastv" else ""
            label = f"{method} {layers} @{budget}".replace("  ", " ")
            rows.append(Setting(label, method, {**params.get(method, {}), "budget": budget}))
    if graphs:
        rows += [Setting(f"{row.label} + graphs", row.method, row.params, True) for row in rows[1:]]
    return rows


def build_model(shape: Shape, attention: str, device: str, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(shape.config, dtype=dtype, attn_implementation=attention)
    return model.eval()


def prompt_inputs(shape: Shape, batch: int, device: str, dtype: torch.dtype, question: str = QUESTION) -> dict:
    messages = [{"role": "user", "content": [{"type": shape.media}, {"type": "text", "text": question}]}]
    text = shape.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    media = {"images": [shape.frames] * batch} if shape.media == "image" else {"videos": [shape.frames] * batch}
    inputs = shape.processor(text=[text] * batch, return_tensors="pt", padding=True, **media)
    return inputs.to(device, dtype=dtype)


def timed(run: Callable[[], object], device: str) -> tuple[float, object]:
    """One run's wall time in ms (CUDA events on a GPU, the CPU clock elsewhere) and its result."""
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        result = run()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end), result
    started = time.perf_counter()
    result = run()
    return 1000 * (time.perf_counter() - started), result


class TokenClock(BaseStreamer):
    """Records when each new token reaches the streamer (the first `put` is the prompt and is skipped)."""

    def __init__(self, device: str) -> None:
        self.device, self.times, self._prompt = device, [], True

    def put(self, value: torch.Tensor) -> None:
        if self._prompt:
            self._prompt = False
            return
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _generate(model: torch.nn.Module, inputs: dict, device: str) -> dict:
    """TTFT and TPOT in ms, peak memory and KV bytes of one greedy generation of NEW_TOKENS tokens."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    clock = TokenClock(device)
    started = time.perf_counter()
    out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                         streamer=clock, return_dict_in_generate=True)  # fmt: skip
    return {
        "ttft_ms": 1000 * (clock.times[0] - started),
        "tpot_ms": 1000 * (clock.times[-1] - clock.times[0]) / (len(clock.times) - 1),
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if device.startswith("cuda") else None,
        "kv_bytes": cache_bytes(cache_of(out)),
    }


def _prefill(model: torch.nn.Module, inputs: dict, encoded: Encoded) -> torch.Tensor:
    """The last position's logits of a prefill on already `encoded` media, with a fresh cache, as `generate` runs
    it."""
    with feeding(model, encoded):
        cache = DynamicCache(config=model.config)
        return model(**inputs, **with_cache(cache), use_cache=True, logits_to_keep=1).logits


def _encoded_prefill(
    model: torch.nn.Module, inputs: dict, features: Encoded | None, device: str, signal: bool = False
) -> tuple:
    """(vision ms, prefill ms): the prefill on `features`, or, where they are None, on what the vision encoder gives
    under the running patch (with the `signal` its method reads, VisionZip's, HoliTom's), timed too."""
    vision_ms = None
    if features is None:
        vision_ms, features = timed(partial(encode, model, inputs, signal=signal), device)
    prefill_ms, _ = timed(partial(_prefill, model, inputs, features), device)
    return vision_ms, prefill_ms


def _under(model: torch.nn.Module, setting: Setting, run: Callable[[], object]) -> tuple[object, object]:
    """`run()` under `setting`; returns its result and the handle's stats (None unpatched)."""
    if setting.method is None:
        return run(), None
    with mmtoken.patched(model, setting.method, cuda_graphs=setting.cuda_graphs, **setting.params) as handle:
        return run(), handle.stats


@torch.no_grad()
def measure(
    shape: Shape,
    model: torch.nn.Module,
    batches: list[int],
    methods: list[str],
    repeats: int,
    generate_repeats: int,
    device: str,
    fractions: tuple[float, ...] = FRACTIONS,
    warmup: int = 2,
    graphs: bool = False,
    question_count: int = 1,
) -> list[dict]:
    """Rows for one shape: every setting at every batch size, as ratios against the unpatched row. With several
    questions (`question_count`), the rounds take them in turn, as requests of other lengths on the same media."""
    rows = []
    dtype = next(model.parameters()).dtype
    for batch in batches:
        prompts = [prompt_inputs(shape, batch, device, dtype, question) for question in questions(question_count)]
        inputs = prompts[0]
        features = encode(model, inputs)
        with mmtoken.patched(model, "fastv", k=1, ratio=1.0) as handle:  # counts the visual tokens
            _prefill(model, inputs, features)
            visual = round(handle.stats.original_visual_tokens)
        depth = len(model.get_decoder().layers)
        grid, skipped, watching = [], [], set()
        for setting in settings(depth, visual, methods, fractions, graphs):
            try:
                method = mmtoken.methods.build(setting.method, **setting.params) if setting.method else None
                if method is not None:
                    method.check_depth(depth)
                    method.cuts(depth, visual)
                    if any(step.needs_vision for step in method.steps):
                        watching.add(setting.label)
                grid.append(setting)
            except ValueError as unreachable:
                skipped.append(
                    {"shape": shape.name, "batch": batch, "setting": setting.label, "skipped": str(unreachable)}
                )
        # the encoder runs in every round for the unpatched model (the reference of the settings that leave it
        # alone) and under the patch of the methods that read its attention or replay it from a graph
        encoding = {grid[0].label} | watching | {setting.label for setting in grid if setting.cuda_graphs}
        times: dict[str, list[float]] = {setting.label: [] for setting in grid}
        vision_times: dict[str, list[float]] = {label: [] for label in encoding}
        stats: dict[str, object] = {}
        # every question's bucket warms up: a graphed prefill's first run is eager and its second captures
        warmup *= question_count
        for round_index in track(range(warmup + repeats), description=f"{shape.name}, batch {batch}: prefill"):
            prompt = prompts[round_index % question_count]
            for setting in grid:
                given = None if setting.label in encoding else features
                run = partial(_encoded_prefill, model, prompt, given, device, setting.label in watching)
                (encoder_ms, prefill_ms), stats[setting.label] = _under(model, setting, run)
                if round_index >= warmup:
                    times[setting.label].append(prefill_ms)
                    if encoder_ms is not None:
                        vision_times[setting.label].append(encoder_ms)
        generated: dict[str, list[dict]] = {setting.label: [] for setting in grid}
        generate_warmup = (2 if graphs else 1) * question_count
        description = f"{shape.name}, batch {batch}: generate"
        for round_index in track(range(generate_warmup + generate_repeats), description=description):
            prompt = prompts[round_index % question_count]
            for setting in grid:
                result, _ = _under(model, setting, partial(_generate, model, prompt, device))
                if round_index >= generate_warmup:
                    generated[setting.label].append(result)
        unpatched = vision_times[grid[0].label]
        vision = {setting.label: statistics.median(vision_times.get(setting.label, unpatched)) for setting in grid}
        rows += _rows(shape, batch, grid, times, stats, generated, vision, visual) + skipped
    return rows


def _rows(shape, batch, grid, times, stats, generated, vision_ms, visual) -> list[dict]:
    def median(label: str, key: str) -> float | None:
        values = [run[key] for run in generated[label] if run[key] is not None]
        return statistics.median(values) if values else None

    base = grid[0].label
    rows = []
    for setting in grid:
        measured, label = stats[setting.label], setting.label
        flops_exact = 1.0 if measured is None else measured.flops_ratio_exact
        row = {
            "shape": shape.name,
            "batch": batch,
            "setting": label,
            "visual_tokens": visual,
            "avg_visual_tokens": float(visual) if measured is None else measured.avg_visual_tokens,
            "vision_ms": vision_ms[label],
            "prefill_ms": statistics.median(times[label]),
            "ttft_ms": median(label, "ttft_ms"),
            "tpot_ms": median(label, "tpot_ms"),
            "peak_memory_bytes": median(label, "peak_memory_bytes"),
            "kv_bytes": median(label, "kv_bytes"),
            "flops_ratio_paper": 1.0 if measured is None else measured.flops_ratio_paper,
            "flops_ratio_exact": flops_exact,
            "flops_ceiling": 1 / flops_exact,
        }
        # paired by round: the unpatched run and this setting's ran one after the other, so drift cancels
        row["prefill_speedup"] = statistics.median(b / t for b, t in zip(times[base], times[label], strict=True))
        for key in ("ttft_ms", "tpot_ms"):
            row[key.replace("_ms", "_speedup")] = median(base, key) / row[key]
        for key in ("peak_memory_bytes", "kv_bytes"):
            row[key.replace("_bytes", "_ratio")] = None if row[key] is None else row[key] / median(base, key)
        rows.append(row)
    return rows


def _realised(row: dict) -> str:
    """The share of the speedup the FLOPs cut allows that the prefill clock shows."""
    if row["flops_ceiling"] < 1.01:
        return "-"
    return f"{100 * (row['prefill_speedup'] - 1) / (row['flops_ceiling'] - 1):.0f}%"


def _ratio(value: float | None, suffix: str = "x") -> str:
    return "-" if value is None else f"{value:.2f}{suffix}"


def markdown(rows: list[dict]) -> str:
    columns = ["batch", "setting", "visual tokens (avg/layer)", "vision ms", "prefill ms", "prefill speedup",
               "FLOPs % paper / exact", "FLOPs ceiling", "realised", "TTFT ms (speedup)", "TPOT ms (speedup)",
               "peak memory GiB (ratio)", "KV MiB (ratio)"]  # fmt: skip
    sections = []
    for shape in dict.fromkeys(row["shape"] for row in rows):
        lines = [f"### {shape}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        for row in (row for row in rows if row["shape"] == shape):
            if "skipped" in row:
                values = [str(row["batch"]), row["setting"], "unreachable: " + row["skipped"]]
                lines.append("| " + " | ".join(values + [""] * (len(columns) - 3)) + " |")
                continue
            memory = "-" if row["peak_memory_bytes"] is None else f"{row['peak_memory_bytes'] / 2**30:.1f}"
            values = [
                str(row["batch"]), row["setting"], f"{row['visual_tokens']} ({row['avg_visual_tokens']:.0f})",
                f"{row['vision_ms']:.1f}", f"{row['prefill_ms']:.1f}", _ratio(row["prefill_speedup"]),
                f"{100 * row['flops_ratio_paper']:.1f} / {100 * row['flops_ratio_exact']:.1f}",
                _ratio(row["flops_ceiling"]), _realised(row),
                f"{row['ttft_ms']:.1f} ({_ratio(row['ttft_speedup'])})",
                f"{row['tpot_ms']:.1f} ({_ratio(row['tpot_speedup'])})",
                f"{memory} ({_ratio(row['peak_memory_ratio'])})",
                f"{row['kv_bytes'] / 2**20:.1f} ({_ratio(row['kv_ratio'])})",
            ]  # fmt: skip
            lines.append("| " + " | ".join(values) + " |")
        sections.append("\n".join(lines))
    return "\n\n".join(sections)


def run(shapes: dict[str, Shape], args: argparse.Namespace, build: Callable[[Shape], torch.nn.Module]) -> list[dict]:
    rows = []
    for shape in shapes.values():
        model = build(shape)
        rows += measure(shape, model, args.batch, args.methods, args.repeats, args.generate_repeats, args.device,
                        tuple(args.fractions), graphs=args.graphs, question_count=args.questions)  # fmt: skip
        del model
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    return rows


def write(rows: list[dict], args: argparse.Namespace, out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    environment = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "attention": args.attention,
        "dtype": args.dtype,
        "new_tokens": NEW_TOKENS,
        "repeats": args.repeats,
        "generate_repeats": args.generate_repeats,
        "graphs": args.graphs,
        "questions": args.questions,
    }
    (out / "speed.json").write_text(json.dumps({"environment": environment, "rows": rows}, indent=1))
    table = markdown(rows)
    (out / "speed.md").write_text(f"Environment: {json.dumps(environment)}\n\n{table}\n")
    return table


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmtoken bench", description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--methods", nargs="*", default=["fastv", "pdrop", "uniform"],
                        help="none: only the unpatched model and the keep-all patch (the hooks' cost)")  # fmt: skip
    parser.add_argument("--fractions", type=float, nargs="+", default=list(FRACTIONS),
                        help="budgets, as fractions of each shape's visual tokens (192/128/64 of 576)")  # fmt: skip
    parser.add_argument("--graphs", action="store_true",
                        help="also time every setting with CUDA graphs (decode steps, vision tower)")  # fmt: skip
    parser.add_argument("--questions", type=int, default=1,
                        help="questions of rising length (5 words apart) that the rounds take in turn")  # fmt: skip
    parser.add_argument("--attention", default="sdpa")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds of encoder and prefill")
    parser.add_argument("--generate-repeats", type=int, default=3, help="timed rounds of the 32-token generate")
    parser.add_argument("--out", type=Path, default=Path("results/speed"))
    return parser


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("mmtoken bench measures GPU speed and needs a CUDA device (or --device cpu for a dry run)")
    shapes = {name: SHAPES[name]() for name in args.shapes}
    dtype = getattr(torch, args.dtype)
    rows = run(shapes, args, lambda shape: build_model(shape, args.attention, args.device, dtype))
    print(write(rows, args, args.out))
