"""`kangaroo-hf train` and `kangaroo-hf distill`."""

from __future__ import annotations

import dataclasses
import logging
import typing

import torch

from ..loading import load_base
from .data import SelfDistillArguments, load_conversations, self_distill
from .trainer import TrainingArguments, train_adapter

logger = logging.getLogger(__name__)


def add_dataclass_arguments(parser, cls) -> None:
    """One `--flag` per dataclass field, typed from its annotation, with the field's help text."""
    import argparse

    hints = typing.get_type_hints(cls)
    for item in dataclasses.fields(cls):
        hint = hints[item.name]
        args = typing.get_args(hint)
        inner = next((a for a in args if a is not type(None)), hint) if args and type(None) in args else hint
        default = item.default if item.default is not dataclasses.MISSING else item.default_factory()
        flag = "--" + item.name.replace("_", "-")
        help_text = f"{item.metadata.get('help', '')} (default: {default})"
        if inner is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif typing.get_origin(inner) is list:
            parser.add_argument(flag, type=typing.get_args(inner)[0], nargs="+", default=default, help=help_text)
        else:
            parser.add_argument(flag, type=inner, default=default, help=help_text)


def _run_train(args) -> int:
    training_args = TrainingArguments(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainingArguments)})
    if args.threads:
        torch.set_num_threads(args.threads)
    base, tokenizer = load_base(args.base, args.base_dtype)
    result = train_adapter(base, args.data, training_args, tokenizer, validation_data=args.validation_data)
    last = result.metrics[-1].get("validation", {}) if result.metrics else {}
    logger.info("Adapter saved to %s after %d steps; last validation: %s", result.output_dir, result.global_step, last)
    return 0


def _run_distill(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    base, tokenizer = load_base(args.base, args.dtype)
    conversations = load_conversations(args.data, args.max_examples, args.max_examples_per_source, args.seed)
    settings = SelfDistillArguments(
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, max_prompt_length=args.max_prompt_length
    )
    results = self_distill(base, tokenizer, conversations, args.output, settings)
    logger.info("%d self-distilled conversations in %s", len(results), args.output)
    return 0


def add_train(subparsers) -> None:
    """Register `kangaroo-hf train` and `kangaroo-hf distill`."""
    parser = subparsers.add_parser(
        "train",
        help="train a Kangaroo adapter (base frozen) on chat JSONL files",
        description="Train a Kangaroo adapter; run under `accelerate launch` for several GPUs.",
    )
    parser.add_argument("--data", nargs="+", required=True, help="JSONL files of {'messages': [...]} conversations")
    parser.add_argument("--validation-data", nargs="+", default=None, help="held-out JSONL files (optional)")
    parser.add_argument("--base", default=None, help="base model id or folder (default: embedded SmolLM2-135M)")
    parser.add_argument("--base-dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    add_dataclass_arguments(parser, TrainingArguments)
    parser.set_defaults(handler=_run_train)

    distill = subparsers.add_parser(
        "distill", help="replace assistant turns of chat JSONL files by the base's own greedy answers"
    )
    distill.add_argument("--data", nargs="+", required=True, help="JSONL files of conversations")
    distill.add_argument("--output", required=True, help="JSONL cache to write (resumed when it exists)")
    distill.add_argument("--base", default=None, help="base model id or folder (default: embedded SmolLM2-135M)")
    distill.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    distill.add_argument("--max-examples", type=int, default=None)
    distill.add_argument("--max-examples-per-source", type=int, default=None)
    distill.add_argument("--max-new-tokens", type=int, default=256)
    distill.add_argument("--max-prompt-length", type=int, default=2047)
    distill.add_argument("--batch-size", type=int, default=16)
    distill.add_argument("--seed", type=int, default=0)
    distill.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    distill.set_defaults(handler=_run_distill)


__all__ = ["add_dataclass_arguments", "add_train"]
