"""`kangaroo-hf` command line: generate, serve, train, distill, bench, profile, tune, push, export."""

from __future__ import annotations

import argparse
import logging
import sys

from ..bench.profile import add_profile
from ..bench.runner import add_bench
from ..bench.tune import add_tune
from ..core.stats import STATS_LOGGER
from ..hub.export import add_export
from ..hub.push import add_push
from ..training.cli import add_train
from .generate import add_generate

# Each registers its sub-command(s) and handler; heavy imports stay inside the handlers.
REGISTRARS = (add_generate, add_train, add_bench, add_profile, add_tune, add_push, add_export)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kangaroo-hf", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    subparsers.add_parser(
        "serve",
        add_help=False,
        help="serve a Kangaroo checkpoint (default: the shipped one) with transformers' OpenAI-compatible server; "
        "takes `transformers serve`'s flags (see `kangaroo-hf serve --help`)",
    )
    for register in REGISTRARS:
        register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:  # transformers' own flags, parsed by its command
        from ..serving import serve

        return serve(argv[1:])
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger(STATS_LOGGER).setLevel(logging.WARNING)  # the commands report statistics themselves
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)


__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
