"""`kangaroo-hf tune`: pick draft settings by measured speed on calibration prompts, then save them into the config.

The search is a grid over `draft_threshold` x `max_draft_tokens` x `lookup_num_tokens` (and over several adapter
folders, e.g. one per exit layer). Each setting decodes the same calibration prompts greedily, interleaved with plain
`generate()` so machine drift hits both alike; the score is the speed-up (plain time / Kangaroo time), with tau
reported beside it. Calibration prompts must be training-style prompts, never the benchmark's.
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


@dataclass
class TuneResult:
    """One grid point: its settings and what it measured on the calibration prompts."""

    model: str
    draft_threshold: float
    max_draft_tokens: int
    lookup_num_tokens: int
    speedup: float
    mean_accepted_tokens: float
    kangaroo_s: float
    plain_s: float
    numerical_ties: int = 0  # outputs that left plain decoding at a logit tie (reduced precision only)


def calibration_prompts(paths: Sequence[str | Path], limit: int, tokenizer) -> list[torch.LongTensor]:
    """First user turns of JSONL conversations (`messages`; `.jsonl.gz` too), rendered with the chat template.

    The prompts are spread over the files and, within a file, over its sources (the `source` field up to its first
    `/`, else the `id` up to its last `-`), taken in turn in file order, so a validation split whose first lines all
    come from one dataset still yields a mixed calibration set.
    """
    from ..loading import chat_input_ids

    per_file = max(1, -(-limit // len(paths)))
    prompts = []
    for path in paths:
        by_source: dict[str, list[tuple[int, dict]]] = {}
        with (gzip.open if str(path).endswith(".gz") else open)(path, "rt", encoding="utf-8") as handle:
            for line_number, line in enumerate(handle):
                row = json.loads(line)
                source = str(row.get("source") or "").split("/")[0] or str(row.get("id", "")).rsplit("-", 1)[0]
                by_source.setdefault(source, []).append((line_number, row))
        in_turn = [pair for group in itertools.zip_longest(*by_source.values()) for pair in group if pair]
        for line_number, row in in_turn[:per_file]:
            messages = row.get("messages") or []
            user = next((m["content"] for m in messages if m.get("role") == "user"), None)
            if user is None:
                raise ValueError(f"{path}:{line_number + 1} has no user message.")
            prompts.append(chat_input_ids(tokenizer, user))
    return prompts[:limit]


@torch.no_grad()
def tune(
    models: dict[str, Any],
    prompts: Sequence[torch.LongTensor],
    thresholds: Sequence[float],
    max_drafts: Sequence[int],
    lookups: Sequence[int] = (0,),
    max_new_tokens: int = 64,
    pad_token_id: int | None = None,
) -> list[TuneResult]:
    """Measure every grid point on `prompts`; `models` maps a name to a loaded `KangarooForCausalLM`."""
    grid = list(itertools.product(models.items(), thresholds, max_drafts, lookups))
    warm_up = dict(do_sample=False, max_new_tokens=min(8, max_new_tokens), pad_token_id=pad_token_id)
    for model in models.values():  # first calls pay one-off costs (allocations, kernel selection): not timed
        model.generate(prompts[0].to(model.device), use_kangaroo=False, **warm_up)
        model.generate(prompts[0].to(model.device), **warm_up)
    results = []
    for (name, model), threshold, max_draft, lookup in tqdm(grid, desc="tune"):
        kangaroo_s = plain_s = 0.0
        new_tokens = verify_steps = ties = 0
        for input_ids in prompts:
            input_ids = input_ids.to(model.device)
            common = dict(do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad_token_id)
            start = time.perf_counter()
            plain = model.generate(input_ids, use_kangaroo=False, **common)
            plain_s += time.perf_counter() - start
            start = time.perf_counter()
            out = model.generate(
                input_ids, draft_threshold=threshold, max_draft_tokens=max_draft, lookup_num_tokens=lookup, **common
            )
            kangaroo_s += time.perf_counter() - start
            ties += _check_lossless(model, input_ids, plain, out, f"{name} (threshold {threshold})")
            new_tokens += model.last_generate_stats.new_tokens
            verify_steps += model.last_generate_stats.verify_steps
        result = TuneResult(
            model=name,
            draft_threshold=threshold,
            max_draft_tokens=max_draft,
            lookup_num_tokens=lookup,
            speedup=plain_s / kangaroo_s,
            mean_accepted_tokens=new_tokens / max(verify_steps, 1),
            kangaroo_s=kangaroo_s,
            plain_s=plain_s,
            numerical_ties=ties,
        )
        logger.info("%s", result)
        results.append(result)
    return sorted(results, key=lambda r: r.speedup, reverse=True)


def _check_lossless(model, input_ids, plain: torch.LongTensor, out: torch.LongTensor, what: str) -> int:
    """0 if `out` equals plain decoding; 1 if it leaves it at a numerical tie (the benchmark's rule); else raise."""
    from .losslessness import GapProbe, default_tie_tolerance, first_divergence, tie_gap

    position = first_divergence(plain[0].tolist(), out[0].tolist())
    if position is None:
        return 0
    start = input_ids.shape[1]
    if start <= position < min(plain.shape[1], out.shape[1]):
        probe = GapProbe(model.get_base_model())
        gap, _ = tie_gap(probe, plain[:, :start], plain[0, start:].tolist(), position - start, int(out[0, position]))
        if gap <= default_tie_tolerance(model.dtype):
            logger.info("%s: a numerical tie at token %d (logit gap %.4f)", what, position - start, gap)
            return 1
    raise RuntimeError(f"{what}: Kangaroo output differs from plain decoding beyond a numerical tie.")


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _run_tune(args: argparse.Namespace) -> int:
    from ..loading import load_model

    torch.manual_seed(args.seed)
    models, tokenizer = {}, None
    for name in args.model or [None]:
        model, tokenizer = load_model(name, args.dtype, args.device)
        models[name or "default"] = model
    prompts = calibration_prompts(args.data, args.num_prompts, tokenizer)
    results = tune(
        models,
        prompts,
        _floats(args.thresholds),
        _ints(args.max_drafts),
        _ints(args.lookups),
        args.max_new_tokens,
        tokenizer.pad_token_id,
    )
    best = results[0]
    for result in results:
        print(
            f"{result.model:<24} threshold {result.draft_threshold:<5} max_drafts {result.max_draft_tokens:<3} "
            f"lookup {result.lookup_num_tokens:<3} speedup {result.speedup:.2f}x tau {result.mean_accepted_tokens:.2f}"
        )
    winner = models[best.model]
    winner.config.draft_threshold = best.draft_threshold
    winner.config.max_draft_tokens = best.max_draft_tokens
    winner.config.lookup_num_tokens = best.lookup_num_tokens
    output = Path(args.output)
    winner.save_pretrained(output)
    (output / "tune_results.json").write_text(json.dumps([asdict(r) for r in results], indent=2))
    print(f"best: {best.model} -> saved to {output} with its settings")
    return 0


def add_tune(subparsers: Any) -> None:
    from ..loading import DTYPES

    parser = subparsers.add_parser("tune", help="choose draft settings by measured speed on calibration prompts")
    parser.add_argument("--model", action="append", help="Kangaroo folder/repo (repeat for several exit layers)")
    parser.add_argument(
        "--data", nargs="+", required=True, help="training-style JSONL or .jsonl.gz (never benchmark prompts)"
    )
    parser.add_argument("--num-prompts", type=int, default=12)
    parser.add_argument("--thresholds", default="0.2,0.4,0.6")
    parser.add_argument("--max-drafts", default="3,6")
    parser.add_argument("--lookups", default="0", help="lookup_num_tokens values, e.g. 0,8")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", required=True, help="folder for the best model (adapter + tuned config)")
    parser.set_defaults(handler=_run_tune)


__all__ = ["TuneResult", "calibration_prompts", "tune"]
