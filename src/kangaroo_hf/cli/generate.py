"""`kangaroo-hf generate`: answer a prompt with Kangaroo and print the speculation statistics."""

from __future__ import annotations

import argparse
import time
import typing

from .. import loading
from ..core.configuration import setting_help
from ..core.drafting import PER_CALL_SETTINGS, DraftSettings
from ..loading import DEFAULT_PROMPT, DTYPES


def _run_generate(args: argparse.Namespace) -> int:
    import torch

    torch.manual_seed(args.seed)
    model, tokenizer = loading.load_model(args.model, args.dtype, args.device)
    input_ids = loading.chat_input_ids(tokenizer, args.prompt).to(model.device)
    sampling = (
        dict(do_sample=args.do_sample, temperature=args.temperature) if args.do_sample else dict(do_sample=False)
    )
    common = dict(max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling)
    kangaroo = not args.no_kangaroo

    def timed(use_kangaroo: bool):
        start = time.perf_counter()
        out = model.generate(
            input_ids,
            use_kangaroo=use_kangaroo,
            **{name: getattr(args, name) for name in PER_CALL_SETTINGS},
            **common,
        )
        return out[0, input_ids.shape[1] :], time.perf_counter() - start

    model.generate(input_ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)  # warm-up
    tokens, seconds = timed(kangaroo)
    print(tokenizer.decode(tokens, skip_special_tokens=True))
    print()
    label = "kangaroo" if kangaroo else "plain generate()"
    print(
        f"[{label}] {len(tokens)} new tokens in {seconds:.2f} s ({len(tokens) / seconds:.1f} tokens/s, {args.dtype})"
    )
    stats = model.last_generate_stats
    if stats is not None:
        rates = ", ".join(f"{rate:.2f}" for rate in stats.acceptance_rate_by_position)
        print(
            f"  mean accepted tokens per verification step: {stats.mean_accepted_tokens:.2f} "
            f"({stats.verify_steps} steps); drafted {stats.drafted_tokens}, accepted {stats.accepted_drafts}"
        )
        print(f"  acceptance rate by draft position: [{rates}]")
    if kangaroo and not args.no_compare:
        plain_tokens, plain_seconds = timed(False)
        print(
            f"[plain generate()] {len(plain_tokens)} new tokens in {plain_seconds:.2f} s "
            f"({len(plain_tokens) / plain_seconds:.1f} tokens/s)"
        )
        print(
            f"  speedup: {plain_seconds / seconds:.2f}x; identical output: {plain_tokens.tolist() == tokens.tolist()}"
        )
        if model.uses_few_row_matmul() or model.uses_packed_weights():
            # Part of that speed-up is a CPU kernel that plain decoding could use too: show the split.
            with model.decoding_kernels([model.get_base_model()], plain_decoding=True):
                _, kernel_seconds = timed(False)
            kernel = f"{args.dtype} {'few-row kernel' if model.uses_few_row_matmul() else 'packed weights'}"
            print(
                f"  of which the {kernel} (plain generate() through it: {kernel_seconds:.2f} s): "
                f"{plain_seconds / kernel_seconds:.2f}x; speculation over it: {kernel_seconds / seconds:.2f}x"
            )
    return 0


def _flag_bool(text: str) -> bool:
    """A bool flag's value: true/false, yes/no, on/off or 1/0."""
    value = text.strip().lower()
    if value in ("true", "yes", "on", "1"):
        return True
    if value in ("false", "no", "off", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_generate(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="answer a prompt with Kangaroo and print speculation statistics")
    parser.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT, help="user message (default: a short question)")
    parser.add_argument("--model", default=None, help="Kangaroo folder or repo id (default: shipped SmolLM2 model)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--device", default="cpu")
    hints = typing.get_type_hints(DraftSettings)
    for name in PER_CALL_SETTINGS:  # the settings `generate()` overrides per call, described where they are defined
        help_text = f"override the model's {name}: {setting_help(name)}"
        kind = _flag_bool if hints[name] is bool else hints[name]
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=help_text)
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-kangaroo", action="store_true", help="decode with the base alone")
    parser.add_argument("--no-compare", action="store_true", help="skip the timed plain generate() runs")
    parser.set_defaults(handler=_run_generate)


__all__ = ["add_generate"]
