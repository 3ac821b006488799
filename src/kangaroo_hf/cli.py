"""`kangaroo-hf` command line: generate, train, bench, push, tune."""

from __future__ import annotations

import argparse
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    from . import commands

    parser = argparse.ArgumentParser(prog="kangaroo-hf", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for register in commands.REGISTRARS:
        register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
