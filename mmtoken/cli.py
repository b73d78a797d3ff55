"""The `mmtoken` command."""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mmtoken", description="Cut the visual tokens of multimodal LLMs.")
    commands = parser.add_subparsers(dest="command", required=True)
    compare = commands.add_parser("compare", help="the probe model unpatched and under each method at 192/128/64")
    compare.add_argument("--per-task", type=int, default=16)
    compare.add_argument("--out", type=Path, default=Path("results"))
    commands.add_parser("bench", help="GPU prefill speed at real model sizes (needs CUDA)", add_help=False)
    commands.add_parser("kvbench", help="GPU memory of long videos under KV presses, at real sizes", add_help=False)
    commands.add_parser("overhead", help="what each method's cuts cost by themselves, at real sizes", add_help=False)
    demo = commands.add_parser("demo", help="the Gradio comparison app on this machine (needs the demo extra)")
    demo.add_argument("--port", type=int, default=7860)
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--models", nargs="+", default=[], metavar="MODEL",
                      help="local folders or hub ids the page offers besides the embedded probe models")  # fmt: skip
    demo.add_argument("--online", action="store_true", help="let hub ids of --models download (default: offline)")
    serve = commands.add_parser("serve", help="an OpenAI-compatible server of a model under a method")
    serve.add_argument("model", help="an embedded probe model (probe-llava, probe-qwen2vl) or a local model folder")
    serve.add_argument("--method", help="a method's name or a YAML file (default: the unpatched model)")
    serve.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                       help="a parameter of the method, e.g. --param budget=64 (repeatable)")  # fmt: skip
    serve.add_argument("--host", default="127.0.0.1", help="the address to bind (default 127.0.0.1: this machine)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--max-batch", type=int, default=8, help="requests prefilled and decoded together")
    serve.add_argument("--batching", choices=["continuous", "overlapped", "chunked", "static"], default="continuous",
                       help="continuous: requests join and leave the decoding batch (default); overlapped: the same, "
                       "prefills in a thread and a CUDA stream of their own beside the decode steps; chunked: the "
                       "same, prefills --chunk-tokens at a time between decode steps (methods that cut before the "
                       "language model); static: a batch runs to its end before the next starts (for h2o)")  # fmt: skip
    serve.add_argument("--chunk-tokens", type=int, default=512, help="prompt tokens per chunk of chunked batching")
    serve.add_argument("--encoder", choices=["local", "thread"], default="local",
                       help="local: the scheduler encodes a request's media before its prefill (default); thread: a "
                       "thread of its own encodes them as requests arrive, on a CUDA stream of its own")  # fmt: skip
    serve.add_argument("--max-waiting", type=int, default=64, help="queued requests past which it answers 429")
    serve.add_argument("--cache-mib", type=int, default=1024, help="size of the embedding cache")
    serve.add_argument("--media-dir", type=Path, help="a folder whose image files requests may name")
    commands.add_parser("loadtest", help="goodput under load: deployments x methods x arrival rates", add_help=False)
    commands.add_parser("sweep", help="models x methods x budgets x tasks through lmms-eval, resumable", add_help=False)
    commands.add_parser("report", help="markdown tables and Pareto plots from sweep results", add_help=False)
    commands.add_parser("tasks-path", help="the lmms-eval task folder of the probe set (for --include_path)")
    commands.add_parser("methods", help="list the methods with their parameters, stage and paper")
    search = commands.add_parser("search", help="search a per-layer schedule on a probe model, written as YAML")
    kinds = search.add_subparsers(dest="kind", required=True)
    greedy = kinds.add_parser("gsearch", help="G-Search: the fewest tokens per layer within a tolerance")
    greedy.add_argument("--tolerance", type=float, default=1.0, help="accuracy points it may lose (default 1)")
    greedy.add_argument("--steps", type=int, default=8, help="counts tried: this many equal fractions (default 8)")
    sigmoid = kinds.add_parser("psigmoid", help="P-Sigmoid: the best sigmoid under a budget (needs optuna)")
    sigmoid.add_argument("--budget", type=float, required=True, help="average visual tokens per layer")
    sigmoid.add_argument("--trials", type=int, default=30)
    for kind in (greedy, sigmoid):
        kind.add_argument("--model", default="probe-llava", choices=["probe-llava"])
        kind.add_argument("--per-task", type=int, default=16, help="calibration samples per task (default 16)")
        kind.add_argument("--seed", type=int, default=0, help="probe seed of the calibration set (default 0)")
        kind.add_argument("--out", type=Path, help="YAML file to write (default results/KIND.yaml)")
    zoo = commands.add_parser("zoo", help="the embedded probe models").add_subparsers(dest="zoo", required=True)
    recipes = ["probe-llava", "probe-qwen2vl", "probe-llava-v2", "probe-qwen2vl-v2"]
    train = zoo.add_parser("train", help="train a probe model (on the GPU), resumable")
    train.add_argument("name", choices=recipes)
    train.add_argument("--pretrained", type=Path, help="start from this tower pretraining checkpoint (v2 recipes)")
    pretrain = zoo.add_parser("pretrain", help="pretrain a v2 probe model's tower on captions (on the GPU), resumable")
    pretrain.add_argument("name", choices=[name for name in recipes if name.endswith("-v2")])
    for stage, steps, batch, lr in ((train, 6000, 128, 6e-4), (pretrain, 3000, 256, 5e-4)):
        stage.add_argument("--out", type=Path, required=True)
        stage.add_argument("--resume", type=Path, help="continue the run checkpointed in this folder")
        stage.add_argument("--steps", type=int, default=steps)
        stage.add_argument("--batch-size", type=int, default=batch)
        stage.add_argument("--lr", type=float, default=lr)
        stage.add_argument("--minutes", type=float, help="stop (with a checkpoint) after this long")
        stage.add_argument("--seed", type=int, default=0)
    args, rest = parser.parse_known_args(argv)
    if args.command == "compare":
        from mmtoken.compare import BrokenMeasurement
        from mmtoken.compare import compare as run_compare

        try:
            run_compare(per_task=args.per_task, out=args.out)
        except BrokenMeasurement as broken:
            parser.exit(1, f"mmtoken compare: {broken}\n")
    elif args.command == "search":
        _search(args)
    elif args.command == "zoo":
        _zoo(args, parser)
    elif args.command == "demo":
        if not args.online:
            import os

            os.environ["HF_HUB_OFFLINE"] = "1"  # huggingface_hub reads it once, when the app below imports it
        try:
            from mmtoken.demos.app import launch
        except ModuleNotFoundError as missing:
            parser.exit(1, f"mmtoken demo needs {missing.name}: pip install 'mmtoken[demo]'\n")
        launch(args.host, args.port, args.models)
    elif args.command == "bench":
        from mmtoken.evaluation.speed import main as bench

        bench(rest)
    elif args.command == "kvbench":
        from mmtoken.evaluation.kv_memory import main as kvbench

        kvbench(rest)
    elif args.command == "overhead":
        from mmtoken.evaluation.overhead import main as overhead

        overhead(rest)
    elif args.command == "serve":
        _serve(args, parser)
    elif args.command == "loadtest":
        from mmtoken.evaluation.serving import main as loadtest

        loadtest(rest)
    elif args.command == "sweep":
        from mmtoken.evaluation.sweep import main as run_sweep

        run_sweep(rest)
    elif args.command == "report":
        from mmtoken.evaluation.report import main as report

        report(rest)
    elif args.command == "tasks-path":
        from mmtoken.evaluation.probe_tasks import tasks_path

        print(tasks_path())
    else:
        from mmtoken import list_methods

        for method in list_methods():
            params = ", ".join(f"{name}={value!r}" for name, value in method["parameters"].items())
            print(f"{method['name']:8} {method['stage']:10} {method['paper']:18} {params}")


def _zoo(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """`mmtoken zoo train` and `mmtoken zoo pretrain`; a bad checkpoint is a message, not a stack trace."""
    schedule = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "minutes": args.minutes,
                "seed": args.seed}  # fmt: skip
    try:
        if args.zoo == "pretrain":
            from mmtoken.zoo.pretrain import PretrainConfig, pretrain

            pretrain(args.name, args.out, PretrainConfig(**schedule), resume=args.resume)
        else:
            from mmtoken.zoo.train import TrainConfig, train

            train(args.name, args.out, TrainConfig(**schedule), resume=args.resume, pretrained=args.pretrained)
    except ValueError as bad:
        parser.exit(2, f"mmtoken zoo {args.zoo}: {bad}\n")


def _search(args: argparse.Namespace) -> None:
    from mmtoken.search import Calibration, g_search, p_sigmoid_search, write_schedule

    calibration = Calibration.of(args.model, args.per_task, args.seed)
    if args.kind == "gsearch":
        found = g_search(calibration, args.tolerance, args.steps)
        options = f"--tolerance {args.tolerance} --steps {args.steps}"
    else:
        found = p_sigmoid_search(calibration, args.budget, args.trials, args.seed)
        options = f"--budget {args.budget} --trials {args.trials}"
    out = args.out or Path("results") / f"{args.kind}.yaml"
    command = f"mmtoken search {args.kind} {options} --model {args.model} --per-task {args.per_task} --seed {args.seed}"
    write_schedule(found, out, [f"found by: {command}", "load with: mmtoken.patch(model, PATH)"])
    print(f"written: {out}")


def _serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    import yaml

    try:
        from mmtoken.staging.server import serve
    except ModuleNotFoundError as missing:
        parser.exit(1, f"mmtoken serve needs {missing.name}: pip install 'mmtoken[serve]'\n")
    params = {}
    for item in args.param:
        name, equals, value = item.partition("=")
        if not equals or not name:
            parser.error(f"--param takes NAME=VALUE, got {item!r}")
        params[name] = yaml.safe_load(value)
    if params and args.method is None:
        parser.error("--param needs a --method")
    if args.chunk_tokens < 1:
        parser.error(f"--chunk-tokens must be >= 1, got {args.chunk_tokens}")
    serve(args.model, args.method, params, args.host, args.port, args.max_batch, args.max_waiting,
          args.cache_mib * 2**20, args.media_dir, args.batching, args.encoder, args.chunk_tokens)  # fmt: skip
