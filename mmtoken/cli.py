"""The `mmtoken` command."""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mmtoken", description="Cut the visual tokens of multimodal LLMs.")
    commands = parser.add_subparsers(dest="command", required=True)
    compare = commands.add_parser("compare", help="the unpatched model next to each method at 192/128/64")
    compare.add_argument("--prompts", type=int, default=8)
    compare.add_argument("--out", type=Path, default=Path("results"))
    commands.add_parser("bench", help="GPU prefill speed at real model sizes (needs CUDA)", add_help=False)
    commands.add_parser("methods", help="list the methods with their parameters, stage and paper")
    args, rest = parser.parse_known_args(argv)
    if args.command == "compare":
        from mmtoken.compare import compare as run_compare

        run_compare(prompts=args.prompts, out=args.out)
    elif args.command == "bench":
        from mmtoken.evaluation.speed import main as bench

        bench(rest)
    else:
        from mmtoken import list_methods

        for method in list_methods():
            params = ", ".join(f"{name}={value!r}" for name, value in method["parameters"].items())
            print(f"{method['name']:8} {method['stage']:10} {method['paper']:18} {params}")
