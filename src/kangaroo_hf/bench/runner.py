"""`kangaroo-hf bench`: Spec-Bench-style speed, acceptance and losslessness report.

Every method answers the first turn of each Spec-Bench question (chat template applied), batch 1, with the same
`max_new_tokens`; methods run interleaved prompt by prompt in one process after a warm-up, and a method's time is the
sum of its `generate()` wall times. Speedup is the base's plain `generate()` time over the method's time. In greedy
mode every output is compared token for token with the base's; see `default_tie_tolerance` for reduced precision.

Methods (the `METHODS` registry in `bench/methods.py`; add a runner there to add a method):

- `vanilla`: `model.get_base_model().generate(...)`, the reference.
- `pld`: transformers' prompt lookup decoding on the base (`prompt_lookup_num_tokens`).
- `early_exit`: transformers' `assistant_early_exit` on the base, exiting at Kangaroo's `exit_layer`, with Kangaroo's
  `draft_threshold` and `max_draft_tokens` as confidence threshold and draft cap: Kangaroo without the adapter.
- `kangaroo`: `model.generate(..., use_kangaroo=True)`.
- `kangaroo_tree` (not run by default): `kangaroo` with tree rounds (the copy and the chain verified together).
- `vanilla_cpu_kernels`, `pld_cpu_kernels` (not run by default; their earlier names `vanilla_few_row`, `pld_few_row`
  are accepted): `vanilla` and `pld` through the CPU kernels Kangaroo decoding uses (`model.decoding_kernels`), to
  separate the kernels' share of Kangaroo's speed-up from speculation's. `vanilla_cpu_kernels` gets those that pay for
  one-token steps (float32: the few-row kernel alone, as packing the weights pays only for products of 3+ rows;
  bfloat16: packed weights), `pld_cpu_kernels` all of Kangaroo's (its verifications are multi-row).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .losslessness import (
    Divergence,
    GapProbe,
    LosslessnessError,
    classify_divergence,
    default_tie_tolerance,
    first_divergence,
    tie_gap,
)
from .methods import (
    DEFAULT_METHOD_OPTIONS,
    DEFAULT_METHODS,
    METHODS,
    REFERENCE_METHOD,
    MethodRun,
    MethodRunner,
    PromptRecord,
    Question,
    method_kernels,
    resolve_method,
)
from .report import build_results, format_summary, write_reports

logger = logging.getLogger(__name__)

QUESTIONS_ENV = "KANGAROO_HF_SPEC_BENCH"
QUESTIONS_RELPATH = Path("shared") / "data" / "spec_bench" / "question.jsonl"
DEFAULT_OUTPUT = "bench_out"


@dataclass
class BenchSettings:
    """What to run and how. `tie_tolerance=None` picks `default_tie_tolerance(model dtype)`."""

    methods: tuple[str, ...] = DEFAULT_METHODS
    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    seed: int = 0
    warmup: int = 1
    repeats: int = 1  # timed runs per method and prompt; the median time is reported
    tie_tolerance: float | None = None
    strict: bool = False
    method_options: dict[str, dict[str, Any]] = field(default_factory=lambda: copy.deepcopy(DEFAULT_METHOD_OPTIONS))
    progress: bool = True

    def __post_init__(self) -> None:
        self.methods = tuple(resolve_method(name) for name in self.methods)
        unknown = [name for name in self.methods if name not in METHODS]
        if unknown:
            raise ValueError(f"Unknown methods {unknown}; choose from {sorted(METHODS)}.")
        if REFERENCE_METHOD not in self.methods:
            raise ValueError(f"methods must include {REFERENCE_METHOD!r} (the speedup reference), got {self.methods}.")
        if self.max_new_tokens < 1 or self.warmup < 0:
            raise ValueError(f"Need max_new_tokens >= 1 and warmup >= 0, got {self.max_new_tokens}, {self.warmup}.")
        if isinstance(self.repeats, bool) or not isinstance(self.repeats, int) or self.repeats < 1:
            raise ValueError(f"repeats must be an int >= 1, got {self.repeats!r}.")
        if self.tie_tolerance is not None and self.tie_tolerance < 0:
            raise ValueError(f"tie_tolerance must be >= 0, got {self.tie_tolerance}.")


def find_questions_file(start: str | Path | None = None) -> Path | None:
    """The Spec-Bench questions: `$KANGAROO_HF_SPEC_BENCH`, else `shared/data/spec_bench/question.jsonl` in `start`
    (default: the working directory) or a folder above it, else the same search from this package's location."""
    if os.environ.get(QUESTIONS_ENV):
        return Path(os.environ[QUESTIONS_ENV])
    for origin in (Path(start or Path.cwd()).resolve(), Path(__file__).resolve().parent):
        for folder in (origin, *origin.parents):
            if (folder / QUESTIONS_RELPATH).is_file():
                return folder / QUESTIONS_RELPATH
    return None


def load_questions(
    path: str | Path, limit_per_category: int | None = None, categories: list[str] | None = None
) -> list[Question]:
    """Read a Spec-Bench JSONL (`question_id`, `category`, `turns`), keeping file order, the first
    `limit_per_category` questions of each category, and only `categories` when given."""
    questions: list[Question] = []
    per_category: dict[str, int] = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            missing = [key for key in ("question_id", "category", "turns") if key not in row]
            if missing or not row.get("turns"):
                raise ValueError(f"{path}:{number}: a question needs question_id, category and turns; got {row}.")
            category = row["category"]
            if categories is not None and category not in categories:
                continue
            if limit_per_category is not None and per_category.get(category, 0) >= limit_per_category:
                continue
            per_category[category] = per_category.get(category, 0) + 1
            questions.append(Question(int(row["question_id"]), category, tuple(row["turns"])))
    if categories is not None and set(categories) - set(per_category):
        raise ValueError(f"No questions of categories {sorted(set(categories) - set(per_category))} in {path}.")
    if not questions:
        raise ValueError(f"No questions in {path}.")
    return questions


def check_against_reference(
    record: PromptRecord, input_ids: torch.LongTensor, probe: GapProbe, tolerance: float
) -> list[Divergence]:
    """Mark each run of `record` identical or not to the reference run; analyse each divergence."""
    reference = record.runs[REFERENCE_METHOD].tokens
    divergences = []
    for name, run in record.runs.items():
        position = first_divergence(reference, run.tokens)
        run.identical = position is None
        if position is None:
            continue
        if position >= len(reference):  # the reference ended first: no base step to compare against
            reference_token, method_token, gap, top2, gap32 = None, run.tokens[position], None, None, None
        else:
            reference_token = reference[position]
            method_token = run.tokens[position] if position < len(run.tokens) else None
            gap = top2 = gap32 = None
            if method_token is not None:
                gap, top2 = tie_gap(probe, input_ids, reference, position, method_token)
                prefix = torch.tensor([reference[:position]], dtype=input_ids.dtype, device=input_ids.device)
                gap32 = probe.float32_gap(torch.cat([input_ids, prefix], dim=1), reference_token, method_token)
        divergence = Divergence(
            method=name,
            question_id=record.question.question_id,
            category=record.question.category,
            position=position,
            reference_token=reference_token,
            method_token=method_token,
            logit_gap=gap,
            top2_gap=top2,
            logit_gap_float32=gap32,
            tie=classify_divergence(gap, tolerance),
        )
        log = logger.info if divergence.tie else logger.warning
        log(
            "%s diverges from vanilla on question %d at token %d: %s",
            name,
            divergence.question_id,
            position,
            divergence,
        )
        divergences.append(divergence)
    return divergences


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(runner: MethodRunner, model: Any, input_ids: torch.LongTensor, gen_kwargs: dict[str, Any]) -> MethodRun:
    _synchronize(input_ids.device)
    start = time.perf_counter()
    tokens, counts = runner(model, input_ids, gen_kwargs)
    _synchronize(input_ids.device)
    return MethodRun(tokens=tokens, time_s=time.perf_counter() - start, counts=counts)


def _generation_kwargs(tokenizer: Any, settings: BenchSettings) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"max_new_tokens": settings.max_new_tokens, "do_sample": settings.do_sample}
    if settings.do_sample:
        kwargs["temperature"] = settings.temperature
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_token_id is not None:
        kwargs["pad_token_id"] = pad_token_id
    return kwargs


def run_benchmark(
    model: Any,
    tokenizer: Any,
    questions: list[Question],
    output_dir: str | Path,
    settings: BenchSettings | None = None,
    description: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Benchmark `settings.methods` on `questions` with an already loaded Kangaroo model; write the reports.

    Args:
        model: a `KangarooForCausalLM` (its base answers `vanilla`, `pld` and `early_exit`).
        tokenizer: its tokenizer; the first turn of each question is rendered with its chat template if it has one.
        questions: from `load_questions`.
        output_dir: receives `results.json`, `results.md`, `speedup.png` and `acceptance.png`.
        settings: methods, lengths, sampling, warm-up, tie tolerance.
        description: extra entries for the report's settings (e.g. the model id and questions file).

    Returns the `results.json` content. With `settings.strict`, raises `LosslessnessError` (after writing the
    reports) if a greedy output differs from the base's by more than a numerical tie.
    """
    from ..loading import chat_input_ids

    settings = settings or BenchSettings()
    dtype = model.dtype
    tolerance = default_tie_tolerance(dtype) if settings.tie_tolerance is None else settings.tie_tolerance
    common = _generation_kwargs(tokenizer, settings)
    prompts = [chat_input_ids(tokenizer, question.turns[0]).to(model.device) for question in questions]
    probe = GapProbe(model.get_base_model())

    def run_all(index: int, record: PromptRecord | None) -> None:
        input_ids = prompts[index]
        runs: dict[str, list[MethodRun]] = {name: [] for name in settings.methods}
        for repeat in range(settings.repeats if record is not None else 1):
            shift = (index + repeat) % len(settings.methods)  # rotate the order so no method always runs first
            for name in settings.methods[shift:] + settings.methods[:shift]:
                gen_kwargs = {
                    **common,
                    "attention_mask": torch.ones_like(input_ids),
                    **settings.method_options.get(name, {}),
                }
                torch.manual_seed(settings.seed + index)
                runs[name].append(_timed(METHODS[name], model, input_ids, gen_kwargs))
        if record is not None:
            for name, repeated in runs.items():
                if any(run.tokens != repeated[0].tokens for run in repeated[1:]):
                    logger.warning(
                        "%s gave different outputs on repeats of question %d; the first is compared.",
                        name,
                        questions[index].question_id,
                    )
                median_time = statistics.median(run.time_s for run in repeated)
                record.runs[name] = replace(repeated[0], time_s=median_time)

    for index in range(min(settings.warmup, len(questions))):
        logger.info("Warm-up %d/%d", index + 1, settings.warmup)
        run_all(index, None)

    from tqdm.auto import tqdm

    records: list[PromptRecord] = []
    divergences: list[Divergence] = []
    totals = dict.fromkeys(settings.methods, 0.0)
    progress = tqdm(total=len(questions), desc="bench", unit="prompt", disable=not settings.progress)
    for index, question in enumerate(questions):
        record = PromptRecord(question=question, prompt_tokens=prompts[index].shape[1])
        run_all(index, record)
        records.append(record)
        if not settings.do_sample:
            divergences += check_against_reference(record, prompts[index], probe, tolerance)
        for name, run in record.runs.items():
            totals[name] += run.time_s
        progress.set_postfix(
            {
                name: f"{totals[REFERENCE_METHOD] / totals[name]:.2f}x"
                for name in settings.methods
                if name != REFERENCE_METHOD
            },
            refresh=False,
        )
        progress.update()
    progress.close()

    details = {
        "dtype": str(dtype).removeprefix("torch."),
        "device": str(model.device),
        "max_new_tokens": settings.max_new_tokens,
        "do_sample": settings.do_sample,
        "temperature": settings.temperature if settings.do_sample else None,
        "seed": settings.seed,
        "warmup": settings.warmup,
        "repeats": settings.repeats,
        "methods": list(settings.methods),
        "method_options": settings.method_options,
        "kernels": {name: method_kernels(name, model) for name in settings.methods},
        "tie_tolerance": tolerance,
        "order": "interleaved per prompt, method order rotated by one each prompt"
        + (f"; median of {settings.repeats} timed runs, rotated again each run" if settings.repeats > 1 else ""),
        "exit_layer": model.config.exit_layer,
        "draft_threshold": model.config.draft_threshold,
        "max_draft_tokens": model.config.max_draft_tokens,
        "base_model": getattr(model.config, "base_model_name_or_path", None),
        **(description or {}),
    }
    results = build_results(records, divergences, settings.methods, details)
    write_reports(results, Path(output_dir))
    if settings.strict and results["lossless"] is False:
        raise LosslessnessError(
            f"{results['failures']} output(s) differ from the base's greedy output by more than a numerical tie "
            f"(tolerance {tolerance}); see {Path(output_dir) / 'results.json'}."
        )
    return results


def _run_bench(args: argparse.Namespace) -> int:
    from ..loading import load_model

    methods = tuple(name.strip() for name in args.methods.split(",") if name.strip())
    options = copy.deepcopy(DEFAULT_METHOD_OPTIONS)
    # Both prompt-lookup methods are one method (one of them through the float32 kernel): the flags set both.
    pld = {"prompt_lookup_num_tokens": args.pld_num_tokens, "max_matching_ngram_size": args.pld_max_ngram}
    options["pld"] = options["pld_cpu_kernels"] = pld
    settings = BenchSettings(
        methods=methods,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample,
        temperature=args.temperature,
        seed=args.seed,
        warmup=args.warmup,
        repeats=args.repeats,
        tie_tolerance=args.tie_tolerance,
        strict=args.strict,
        method_options=options,
    )
    path = Path(args.questions) if args.questions else find_questions_file()
    if path is None:
        raise FileNotFoundError(
            f"No Spec-Bench questions found: pass --questions, set ${QUESTIONS_ENV}, or run below a folder holding "
            f"{QUESTIONS_RELPATH}."
        )
    categories = [name.strip() for name in args.categories.split(",")] if args.categories else None
    questions = load_questions(path, args.limit_per_category, categories)
    logger.info("%d questions from %s", len(questions), path)
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model, args.dtype, args.device)
    description = {"model": args.model or "default (shipped SmolLM2-135M-Instruct Kangaroo)", "questions": str(path)}
    description["limit_per_category"] = args.limit_per_category
    if args.batch_size:
        return _run_batched(args, model, tokenizer, questions, description)
    try:
        results = run_benchmark(model, tokenizer, questions, args.output, settings, description)
    except LosslessnessError as error:
        logger.error("%s", error)
        return 1
    print(format_summary(results, Path(args.output)))
    return 0


def _run_batched(args: argparse.Namespace, model: Any, tokenizer: Any, questions: list[Question], description) -> int:
    from .batched import BATCH_METHODS, render_batched_markdown, run_batched_benchmark

    batch_sizes = [int(size) for size in args.batch_size.split(",")]
    methods = tuple(resolve_method(name.strip()) for name in args.methods.split(",") if name.strip())
    if methods == DEFAULT_METHODS:  # the batch-1 defaults include methods transformers cannot batch
        methods = tuple(BATCH_METHODS)
    if args.do_sample:
        raise ValueError(
            "--batch-size measures greedy decoding (outputs are compared with the base's); drop --do-sample."
        )
    results = run_batched_benchmark(
        model,
        tokenizer,
        questions,
        args.output,
        batch_sizes,
        methods,
        args.max_new_tokens,
        args.repeats,
        warmup=args.warmup > 0,
        description=description,
    )
    print(render_batched_markdown(results))
    return 0


def add_bench(subparsers: Any) -> None:
    """Register `kangaroo-hf bench`."""
    parser = subparsers.add_parser(
        "bench", help="Spec-Bench speed / acceptance / losslessness report: vanilla, PLD, early exit, Kangaroo"
    )
    parser.add_argument("--model", default=None, help="Kangaroo folder or repo id (default: shipped SmolLM2 model)")
    parser.add_argument("--questions", default=None, help=f"Spec-Bench JSONL (default: ${QUESTIONS_ENV} or found)")
    parser.add_argument("--categories", default=None, help="comma list of categories to keep (default: all)")
    parser.add_argument("--limit-per-category", type=int, default=None, help="first N questions of each category")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma list from {', '.join(METHODS)}")
    parser.add_argument("--do-sample", action="store_true", help="sample (outputs are then not compared)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--warmup", type=int, default=1, help="untimed prompts run by every method first")
    parser.add_argument(
        "--repeats", type=int, default=1, help="timed runs per method and prompt; each prompt's time is their median"
    )
    parser.add_argument(
        "--tie-tolerance",
        type=float,
        default=None,
        help="max base logit gap for a divergence to count as a numerical tie (default: 0 float32, 0.25 bfloat16)",
    )
    parser.add_argument("--pld-num-tokens", type=int, default=10, help="pld, pld_cpu_kernels: tokens per step")
    parser.add_argument("--pld-max-ngram", type=int, default=2, help="pld, pld_cpu_kernels: longest n-gram matched")
    parser.add_argument(
        "--batch-size",
        default=None,
        help="comma list of batch sizes (e.g. 1,2,4,8): batched Kangaroo against batched plain generate() (methods "
        "vanilla, vanilla_cpu_kernels, kangaroo; greedy)",
    )
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help="report folder")
    parser.add_argument("--strict", action="store_true", help="exit non-zero if an output is not lossless")
    parser.set_defaults(handler=_run_bench)


def main(argv: list[str] | None = None) -> int:
    """`python -m kangaroo_hf.bench ...`: the same as `kangaroo-hf bench ...`."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(prog="python -m kangaroo_hf.bench")
    add_bench(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    return int(args.handler(args) or 0)


__all__ = [
    "METHODS",
    "BenchSettings",
    "Divergence",
    "LosslessnessError",
    "MethodRun",
    "PromptRecord",
    "Question",
    "add_bench",
    "check_against_reference",
    "classify_divergence",
    "default_tie_tolerance",
    "find_questions_file",
    "first_divergence",
    "load_questions",
    "main",
    "run_benchmark",
]

if __name__ == "__main__":
    raise SystemExit(main())
