"""Method overhead at real sizes: what each cut of a method costs by itself (scoring, selection, reduction).

A method adds this to the prefill on top of the layers it shortens. Each cut runs on random hidden states of one
decoder layer of the shape's language model (random weights, the checkpoint's sizes; the layer before the cut for
scorers that mimic it), with the speed harness's text tokens and the visual tokens the earlier cuts left, and is
timed with CUDA events: the median of rounds, eagerly and, for the methods whose counts the budget fixes, replayed
from a CUDA graph as a graphed prefill runs it. Methods that decide their counts read them on the host; they stay eager.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
from rich.progress import track
from transformers import AutoConfig, AutoModel

import mmtoken
from mmtoken.engine.select import select
from mmtoken.evaluation.speed import FRACTIONS, settings, timed
from mmtoken.scorers.base import ScoreInput, decides_count
from mmtoken.state import IMAGE, VIDEO

TEXT_TOKENS = 60  # the speed harness's prompt: the chat template and a 28-word question
SHAPES = {  # name: (text config of the checkpoint, media, frames, rows and columns of a frame's grid)
    "llava15-7b": ({"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                    "num_attention_heads": 32, "num_key_value_heads": 32}, IMAGE, 1, 24),
    "onevision-7b-video": ({"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944,
                            "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                            "rope_theta": 1_000_000.0}, VIDEO, 32, 14),
}  # fmt: skip


def cut_inputs(language: torch.nn.Module, batch: int, media: int, side: int, visual: int) -> Callable[[], ScoreInput]:
    """A maker of fresh inputs (scorers memoise on them) for a cut over `TEXT_TOKENS` text tokens around the first
    `visual` tokens of frames of `side` x `side` visual tokens, at `language`'s layer 1."""
    length = TEXT_TOKENS + visual
    device = language.embed_tokens.weight.device
    dtype = language.embed_tokens.weight.dtype
    first = TEXT_TOKENS // 2
    candidates = torch.zeros(batch, length, dtype=torch.bool, device=device)
    candidates[:, first : first + visual] = True
    kinds = torch.where(candidates, media, 0)
    place = torch.arange(visual, device=device)
    grid = torch.stack([torch.zeros_like(place), place // side**2, place % side**2 // side, place % side], 1)
    geometry = torch.full((batch, length, 4), -1, device=device)
    geometry[:, first : first + visual] = grid
    generator = torch.Generator(device).manual_seed(0)
    hidden = torch.randn(batch, length, language.config.hidden_size, device=device, dtype=dtype, generator=generator)
    signal = torch.rand(batch, length, device=device, generator=generator)
    embeddings = language.rotary_emb(hidden, torch.arange(length, device=device).expand(batch, -1))
    return lambda: ScoreInput(
        hidden, language.layers[1], embeddings, candidates, torch.ones_like(candidates), lambda: geometry,
        kinds=kinds, weight=torch.ones(batch, length, device=device), keep=None,
        visual_counts=[visual] * batch, measure=lambda: signal,
    )  # fmt: skip


def _cut_runner(make_inputs: Callable[[], ScoreInput], scorer, reducer, keep: int) -> Callable[[], object]:
    def run() -> object:
        inputs = make_inputs()
        batch = inputs.candidates.shape[0]
        inputs.keep = [keep] * batch
        width = None if decides_count(scorer) else TEXT_TOKENS + keep
        kept = torch.full((batch,), keep, device=inputs.candidates.device)
        local, valid = select(scorer.score(inputs), inputs.candidates, inputs.valid, kept, width)
        return reducer.reduce(inputs.hidden, local, valid, inputs)

    return run


def _graphed(run: Callable[[], object]) -> Callable[[], object]:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    return graph.replay


def measure(shape: str, batches: list[int], methods: list[str], fractions: tuple[float, ...], repeats: int,
            device: str, spec: tuple | None = None) -> list[dict]:  # fmt: skip
    """One row per method, budget, cut and batch size: the cut's eager ms (and graphed ms where it applies).
    `spec` stands in for `SHAPES[shape]`."""
    text_config, media, frames, side = spec or SHAPES[shape]
    config = AutoConfig.for_model(**(text_config | {"num_hidden_layers": 2}))
    torch.manual_seed(0)
    with torch.device(device):
        language = AutoModel.from_config(config, dtype=torch.bfloat16).eval()
    depth, visual = text_config["num_hidden_layers"], frames * side * side
    rows = []
    for batch in batches:
        for setting in track(settings(depth, visual, methods, fractions)[2:], description=f"{shape}, batch {batch}"):
            try:
                method = mmtoken.methods.build(setting.method, **setting.params)
                method.check_depth(depth)
                cuts = method.cuts(depth, visual)
            except ValueError as unreachable:
                rows.append({"shape": shape, "batch": batch, "setting": setting.label, "skipped": str(unreachable)})
                continue
            alive = visual
            for number, cut in enumerate(cuts):
                scorer, reducer = cut.scorer or method.scorer, cut.reducer or method.reducer
                make_inputs = cut_inputs(language, batch, media, side, alive)
                run = _cut_runner(make_inputs, scorer, reducer, min(round(cut.keep), alive))
                row = {"shape": shape, "batch": batch, "setting": setting.label, "cut": number, "layer": cut.layer,
                       "keep": round(cut.keep), "eager_ms": _median_ms(run, repeats, device)}  # fmt: skip
                row["graphed_ms"] = None
                if device.startswith("cuda") and not decides_count(scorer):
                    row["graphed_ms"] = _median_ms(_graphed(run), repeats, device)
                rows.append(row)
                alive = min(round(cut.keep), alive)
    return rows


def _median_ms(run: Callable[[], object], repeats: int, device: str) -> float:
    with torch.no_grad():
        run()  # warm-up: kernels compile, caches fill
        return statistics.median(timed(run, device)[0] for _ in range(repeats))


def markdown(rows: list[dict]) -> str:
    lines = ["| shape | batch | setting | cut (layer, keep) | eager ms | graphed ms |", "|---|---|---|---|---|---|"]
    for row in rows:
        if "skipped" in row:
            lines.append(f"| {row['shape']} | {row['batch']} | {row['setting']} | unreachable: {row['skipped']} | | |")
            continue
        graphed = "-" if row["graphed_ms"] is None else f"{row['graphed_ms']:.3f}"
        lines.append(f"| {row['shape']} | {row['batch']} | {row['setting']} | {row['cut']} ({row['layer']}, "
                     f"{row['keep']}) | {row['eager_ms']:.3f} | {graphed} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mmtoken overhead", description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--methods", nargs="+", default=["fastv", "pdrop", "divprune", "visionzip", "aim"])
    parser.add_argument("--fractions", type=float, nargs="+", default=list(FRACTIONS))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=Path("results/overhead"))
    args = parser.parse_args(argv)
    rows = [row for shape in args.shapes for row in measure(shape, args.batch, args.methods, tuple(args.fractions),
                                                            args.repeats, args.device)]  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "overhead.json").write_text(json.dumps(rows, indent=1))
    table = markdown(rows)
    (args.out / "overhead.md").write_text(table + "\n")
    print(table)
