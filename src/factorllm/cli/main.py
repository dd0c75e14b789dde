"""Entry point of the `factorllm` command. Subcommands import their heavy dependencies inside `run`, so
`factorllm --help` is instant."""

from __future__ import annotations

import argparse
import sys

from factorllm.cli import bench, convert, eval, export, run, sparsify, train

SUBCOMMANDS = [run, convert, sparsify, train, eval, export, bench]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="factorllm", description="Turn a dense decoder LM into a Mixture-of-Experts model (FactorLLM)."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except (ValueError, FileExistsError, FileNotFoundError, ModuleNotFoundError, RuntimeError) as err:
        # Bad input: one clear line, no traceback. Bugs (anything else) keep their traceback.
        print(f"factorllm {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
