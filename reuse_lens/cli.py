"""The ``reuse-lens`` command. It parses arguments and calls the library; no logic lives here."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _cmd_zoo(args: argparse.Namespace) -> int:
    from reuse_lens import zoo

    if args.zoo_command == "list":
        for name in zoo.available():
            print(f"zoo:{name}")
        if not zoo.available():
            print(zoo.status())
        return 0
    if args.zoo_command == "train":
        import logging

        from reuse_lens.zoo.train import TOLERANCE, train

        logging.basicConfig(level=logging.INFO, format="%(message)s")
        result = train(args.only or None, check=args.check)
        if not args.check:
            print(f"trained and wrote {', '.join(f'zoo:{n}' for n in result['models'])}")
            return 0
        if result["problems"]:
            print(f"NOT reproduced (tolerance {TOLERANCE}):")
            for line in result["problems"]:
                print(f"  {line}")
            return 1
        print(f"reproduced: held-out scores within {TOLERANCE} of the manifest")
        return 0
    print(zoo.status())
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from reuse_lens import zoo

    print(zoo.status())
    if not zoo.available():
        print(
            f"reuse-lens demo needs the zoo's trained models; nothing was written to {args.out!r}.",
            file=sys.stderr,
        )
        return 0
    print("The demo pipeline (discover, compare, report) is not built yet.", file=sys.stderr)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import reuse_lens as rl

    model = rl.load_model(args.model)
    task = rl.tasks.load(args.task, model, n=args.n, seed=args.seed)
    for key, value in rl.evaluate(model, task).items():
        print(f"{key:>24s}  {value:.4f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reuse-lens",
        description="Find task circuits in transformers and measure which components are reused.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="run the main job on the zoo and write a report")
    demo.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    demo.set_defaults(func=_cmd_demo)

    evaluate = sub.add_parser("evaluate", help="score a model on a built-in task")
    evaluate.add_argument("--model", required=True, help="zoo:<name>, a folder or a hub id")
    evaluate.add_argument("--task", required=True, help="a built-in task name")
    evaluate.add_argument("--n", type=int, default=64, help="number of prompt pairs")
    evaluate.add_argument("--seed", type=int, default=0, help="prompt seed")
    evaluate.set_defaults(func=_cmd_evaluate)

    zoo = sub.add_parser(
        "zoo", help="the embedded models: list them, show their status, or retrain them"
    )
    zoo.add_argument("zoo_command", choices=["list", "status", "train"], help="what to do")
    zoo.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help="train: only this model (repeatable), e.g. --only base",
    )
    zoo.add_argument(
        "--check",
        action="store_true",
        help="train: retrain in a temporary folder and compare held-out scores with the manifest",
    )
    zoo.set_defaults(func=_cmd_zoo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from reuse_lens.models import ModelLoadError
    from reuse_lens.tasks.task import TaskError
    from reuse_lens.zoo import ZooError

    try:
        return int(args.func(args))
    except (ModelLoadError, TaskError, ZooError) as error:
        parser.exit(2, f"reuse-lens: error: {error}\n")


if __name__ == "__main__":
    sys.exit(main())
