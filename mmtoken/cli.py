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
    commands.add_parser("sweep", help="models x methods x budgets x tasks through lmms-eval, resumable", add_help=False)
    commands.add_parser("report", help="markdown tables and Pareto plots from sweep results", add_help=False)
    commands.add_parser("tasks-path", help="the lmms-eval task folder of the probe set (for --include_path)")
    commands.add_parser("methods", help="list the methods with their parameters, stage and paper")
    zoo = commands.add_parser("zoo", help="the embedded probe models").add_subparsers(dest="zoo", required=True)
    train = zoo.add_parser("train", help="train a probe model (on the GPU), resumable")
    train.add_argument("name", choices=["probe-llava"])
    train.add_argument("--out", type=Path, required=True)
    train.add_argument("--resume", type=Path)
    train.add_argument("--steps", type=int, default=6000)
    train.add_argument("--batch-size", type=int, default=128)
    train.add_argument("--lr", type=float, default=6e-4)
    train.add_argument("--minutes", type=float, help="stop (with a checkpoint) after this long")
    train.add_argument("--seed", type=int, default=0)
    args, rest = parser.parse_known_args(argv)
    if args.command == "compare":
        from mmtoken.compare import compare as run_compare

        run_compare(per_task=args.per_task, out=args.out)
    elif args.command == "zoo":
        from mmtoken.zoo.train import TrainConfig, train

        config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, minutes=args.minutes,
                             seed=args.seed)  # fmt: skip
        train(args.name, args.out, config, resume=args.resume)
    elif args.command == "bench":
        from mmtoken.evaluation.speed import main as bench

        bench(rest)
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
