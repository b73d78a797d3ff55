"""Serving under load: a trace of requests (Poisson or gamma arrivals, a mix of images, multi-image prompts and
videos) replayed in open loop at rising rates, against each deployment and each method, in one run; per run the SLO
attainment, goodput and the TTFT / TPOT percentiles, with plots.

Deployments: `colocated` (the encoder takes its turn in the model's process, between batches), `threaded` (the encoder
in a thread of the model's process, on a CUDA stream of its own, as requests arrive), `staged` (the encoder in a
process of its own, `mmtoken.staging.staged`; needs `torchrun --nproc-per-node N`, N - 1 encoders), and
`staged-cache` (staged, through the encoders' embedding caches). Under torchrun, the last rank runs every deployment
and the others encode; without it, the staged ones cannot run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
from pathlib import Path

import torch
import yaml

import mmtoken
from mmtoken.evaluation.speed import SHAPES, build_model
from mmtoken.integrations import adapter_for
from mmtoken.staging.chunked import check_chunkable
from mmtoken.staging.continuous import BATCHING, check_joinable, make_scheduler
from mmtoken.staging.embedding_cache import EmbeddingCache
from mmtoken.staging.encoders import LocalEncoder, ThreadEncoder
from mmtoken.staging.load import KINDS, make_trace, read_trace, write_trace
from mmtoken.staging.metrics import SLO, summarize
from mmtoken.staging.replay import replay
from mmtoken.staging.staged import RemoteEncoder, model_device, serve_encodings, start_stages

DEPLOYMENTS = ("colocated", "threaded", "staged", "staged-cache")


def method_spec(text: str) -> tuple[str, str | None, dict]:
    """`none`, or `NAME` / `NAME:PARAM=VALUE,PARAM=VALUE` (values read as YAML): the label, method and parameters."""
    if text == "none":
        return "unpatched", None, {}
    name, _, rest = text.partition(":")
    params = {}
    for item in filter(None, rest.split(",")):
        key, equals, value = item.partition("=")
        if not equals:
            raise ValueError(f"a method's parameters are PARAM=VALUE, got {item!r} in {text!r}")
        params[key] = yaml.safe_load(value)
    return text, name, params


def weights(text: str) -> dict[str, float]:
    """`image=0.5,video=0.5` as a dict."""
    pairs = [item.partition("=") for item in text.split(",")]
    return {key: float(value) for key, _, value in pairs}


def traces(args: argparse.Namespace) -> dict[float, list]:
    """The trace of each rate: drawn (and written beside the results, to replay), or the one file given, at its
    mean rate."""
    if args.trace is not None:
        trace = read_trace(args.trace)
        return {len(trace) / max(row.at for row in trace): trace}
    counts = {kind: int(value) for kind, value in weights(args.counts).items()}
    drawn = {}
    for rate in args.rates:
        drawn[rate] = make_trace(args.count, rate, weights(args.mix), counts, args.max_tokens, args.repeat,
                                 args.process, args.seed)  # fmt: skip
        write_trace(drawn[rate], args.out / f"trace-{rate:g}.jsonl")
    return drawn


def load_model(model: str, device: torch.device) -> tuple[torch.nn.Module, object]:
    """An embedded probe model, a local folder, or `random:SHAPE`: a speed shape's model at its real size with
    random weights (the same in every process: the seed is fixed)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mmtoken.zoo.embedded import NAMES, load

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if model.startswith("random:"):
        name = model.removeprefix("random:")
        if name not in SHAPES:
            raise SystemExit(f"mmtoken loadtest: random:{name} is not a speed shape ({', '.join(SHAPES)})")
        shape = SHAPES[name]()
        return build_model(shape, "sdpa", str(device), dtype), shape.processor
    if model in NAMES:
        loaded, processor = load(model, dtype)
    else:
        loaded = AutoModelForImageTextToText.from_pretrained(model, dtype=dtype, local_files_only=True).eval()
        processor = AutoProcessor.from_pretrained(model, local_files_only=True)
    return loaded.to(device), processor


def media_size(processor: object) -> tuple[int, int]:
    """The (height, width) of the images and frames the load's prompts are drawn at: the processor's own size."""
    size = processor.image_processor.size
    side = size.get("shortest_edge") or size.get("height") or 224
    return (side, side) if side < 2048 else (448, 448)


def run_deployments(
    model: torch.nn.Module, processor: object, args: argparse.Namespace, remote: RemoteEncoder | None
) -> list[dict]:
    """A row per deployment x method x batching x rate: the trace's summary and its records."""
    settings = processor.image_processor.to_dict()
    slo = SLO(args.slo_ttft, args.slo_tpot)
    by_rate = traces(args)
    rows = []
    for deployment in args.deployments:
        for spec in args.methods:
            label, method, params = method_spec(spec)
            handle = mmtoken.patch(model, method, **params) if method else None
            signal = handle is not None and any(step.needs_vision for step in handle.method.steps)
            try:
                for batching, rate in itertools.product(args.batching, by_rate):
                    if deployment == "colocated":
                        encoder = LocalEncoder(model, None, settings, signal)
                    elif deployment == "threaded":
                        encoder = ThreadEncoder(model, None, settings, signal)
                    else:
                        encoder, remote.cached, remote.signal = remote, deployment == "staged-cache", signal
                        remote.clear_cache()
                    scheduler = make_scheduler(batching, model, processor, encoder, args.max_batch, args.max_waiting,
                                               args.chunk_tokens)  # fmt: skip
                    name = f"{deployment} {label} {batching} @{rate:g}/s"
                    records = replay(scheduler.start(), processor, by_rate[rate], media_size(processor), name)
                    scheduler.close()
                    if deployment == "threaded":
                        encoder.close()
                    rows.append({"deployment": deployment, "method": label, "batching": batching, "rate": rate,
                                 **summarize(records, slo), "records": records})  # fmt: skip
            finally:
                if handle is not None:
                    mmtoken.unpatch(model)
    return rows


def markdown(rows: list[dict], environment: dict) -> str:
    columns = ["deployment", "method", "batching", "rate req/s", "answered / sent", "SLO attained", "goodput req/s",
               "TTFT p50 / p99 s", "TPOT p50 / p99 ms", "queue p50 s",
               "step p99 quiet / during videos ms (rise)"]  # fmt: skip

    def number(value: float | None, scale: float = 1, digits: int = 2) -> str:
        return "-" if value is None else f"{value * scale:.{digits}f}"

    lines = [
        f"Environment: {json.dumps(environment)}",
        "",
        "| " + " | ".join(columns) + " |",
        "|---" * len(columns) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join([
            row["deployment"], row["method"], row["batching"], f"{row['rate']:g}",
            f"{row['answered']} / {row['requests']}",
            number(row["slo_attainment"], 100, 0) + "%", number(row["goodput_rps"]),
            f"{number(row['ttft_p50_s'])} / {number(row['ttft_p99_s'])}",
            f"{number(row['tpot_p50_s'], 1000, 1)} / {number(row['tpot_p99_s'], 1000, 1)}", number(row["queue_p50_s"]),
            f"{number(row['step_p99_quiet_s'], 1000, 1)} / {number(row['step_p99_during_heavy_s'], 1000, 1)} "
            f"({number(row['step_rise'])}x)",
        ]) + " |")  # fmt: skip
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Goodput against rate per deployment and method, and the TTFT and TPOT distributions at the highest rate."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, (goodput, ttft, tpot) = pyplot.subplots(1, 3, figsize=(15, 4))
    top = max(row["rate"] for row in rows)
    for key in dict.fromkeys((row["deployment"], row["method"], row["batching"]) for row in rows):
        runs = [row for row in rows if (row["deployment"], row["method"], row["batching"]) == key]
        goodput.plot([row["rate"] for row in runs], [row["goodput_rps"] or 0 for row in runs], marker="o",
                     label=" / ".join(key))  # fmt: skip
        last = next(row for row in runs if row["rate"] == top)
        for axes, name, scale in ((ttft, "ttft_s", 1), (tpot, "tpot_s", 1000)):
            values = sorted(record[name] * scale for record in last["records"] if record.get(name) is not None)
            axes.plot(values, [(index + 1) / len(values) for index in range(len(values))], label=" / ".join(key))
    goodput.set(xlabel="arrival rate (req/s)", ylabel="goodput (req/s within the SLO)", title="goodput")
    ttft.set(xlabel="TTFT (s)", ylabel="share of requests", title=f"TTFT at {top:g} req/s")
    tpot.set(xlabel="TPOT (ms)", ylabel="share of requests", title=f"TPOT at {top:g} req/s")
    goodput.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmtoken loadtest", description=__doc__.splitlines()[0])
    parser.add_argument(
        "model",
        help="an embedded probe model, a local model folder, or random:SHAPE (a speed shape "
        "at its real size with random weights, e.g. random:onevision-7b-video)",
    )
    parser.add_argument("--deployments", nargs="+", choices=DEPLOYMENTS, default=["colocated"])
    parser.add_argument("--methods", nargs="+", default=["none"], help="none, NAME or NAME:PARAM=VALUE,...")
    parser.add_argument("--rates", type=float, nargs="+", default=[1.0, 2.0, 4.0], help="arrivals per second")
    parser.add_argument("--count", type=int, default=40, help="requests per trace")
    parser.add_argument("--process", choices=["poisson", "gamma"], default="poisson")
    parser.add_argument("--mix", default="image=1", help=f"weights of the kinds {', '.join(KINDS)}")
    parser.add_argument("--counts", default="images=4,video=32", help="images of a multi-image prompt, frames")
    parser.add_argument("--repeat", type=float, default=0.0, help="chance a request repeats earlier media")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--trace", type=Path, help="replay this trace file instead of drawing one per rate")
    parser.add_argument("--slo-ttft", type=float, default=1.4, help="seconds (EPD's SLO)")
    parser.add_argument("--slo-tpot", type=float, default=0.04, help="seconds per output token")
    parser.add_argument("--batching", nargs="+", choices=list(BATCHING), default=["static"],
                        help="static: a batch runs to its end before the next starts; continuous: requests join "
                        "and leave the decoding batch; overlapped: continuous, prefills in a thread and a CUDA "
                        "stream of their own beside the decode steps; chunked: continuous, prefills a chunk of "
                        "--chunk-tokens at a time between decode steps")  # fmt: skip
    parser.add_argument("--chunk-tokens", type=int, default=512, help="prompt tokens per chunk of chunked batching")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-waiting", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("results/serving"))
    return parser


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.chunk_tokens < 1:
        raise SystemExit(f"mmtoken loadtest: --chunk-tokens must be >= 1, got {args.chunk_tokens}")
    built = {}
    for spec in args.methods:
        _, method, params = method_spec(spec)
        if method is not None:
            built[spec] = mmtoken.methods.build(method, **params)  # a bad method or parameter fails here
            if set(args.batching) - {"static"}:
                try:
                    check_joinable(built[spec])
                except ValueError as error:
                    raise SystemExit(f"mmtoken loadtest: {spec}: {error}") from None
    staged = [deployment for deployment in args.deployments if deployment.startswith("staged")]
    stages = start_stages() if staged or "RANK" in os.environ else None
    device = model_device(stages) if stages else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, processor = load_model(args.model, device)
    if "chunked" in args.batching:  # before any request: the depth is the loaded model's
        for spec, method in built.items():
            try:
                check_chunkable(method, len(adapter_for(model).decoder_layers))
            except ValueError as error:
                raise SystemExit(f"mmtoken loadtest: {spec}: {error}") from None
    if stages is not None and stages.encodes:
        serve_encodings(model, stages, EmbeddingCache(2**30 * 8), processor.image_processor.to_dict())
        return
    args.out.mkdir(parents=True, exist_ok=True)
    remote = None if stages is None else RemoteEncoder(model, stages)
    try:
        rows = run_deployments(model, processor, args, remote)
    finally:
        if remote is not None:
            remote.close()
    options = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    environment = {"model": args.model, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                   "torch": torch.__version__, "transformers": __import__("transformers").__version__,
                   "transport": None if stages is None else str(stages.device),
                   "encoders": None if stages is None else len(stages.encoder_ranks), **options}  # fmt: skip
    (args.out / "serving.json").write_text(json.dumps({"environment": environment, "rows": rows}))
    table = markdown(rows, environment)
    (args.out / "serving.md").write_text(table + "\n")
    plot(rows, args.out / "serving.png")
    print(table)
