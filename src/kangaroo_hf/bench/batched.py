"""`kangaroo-hf bench --batch-size 1,2,4,8`: batched Kangaroo against plain batched `generate()`.

For each batch size B the same prompts (the first N questions, N the largest multiple of the largest B) are answered
B at a time, left-padded as transformers batches decoder-only prompts, by every method, interleaved chunk by chunk
(order rotated each chunk) after an untimed warm-up chunk. Throughput is new tokens (each row up to and including
its EOS) per second of `generate()` wall time; speedups are throughput ratios at the same B. Every Kangaroo row is
compared with the base's batched output for the same chunk (a difference is a numerical tie when the base's logits of
the two tokens at the first differing token are within `default_tie_tolerance`, as in the batch-1 bench), and each
row's tau is set beside the same prompt's tau at batch 1.

Methods: `vanilla` (the base's batched `generate()`), `vanilla_cpu_kernels` (the same through the CPU kernels that
pay for plain decoding, as in the batch-1 bench) and `kangaroo` (`model.generate()` on the batch).
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..core.stats import KangarooStats
from .losslessness import GapProbe, classify_divergence, default_tie_tolerance, first_divergence, tie_gap
from .methods import Question
from .report import machine_info

logger = logging.getLogger(__name__)

BatchRunner = Callable[[Any, torch.LongTensor, dict[str, Any]], tuple[torch.LongTensor, KangarooStats | None]]


def _vanilla(model: Any, input_ids: torch.LongTensor, kwargs: dict[str, Any]):
    return model.get_base_model().generate(input_ids, **kwargs), None


def _vanilla_cpu_kernels(model: Any, input_ids: torch.LongTensor, kwargs: dict[str, Any]):
    with model.decoding_kernels([model.get_base_model()], plain_decoding=True):
        return _vanilla(model, input_ids, kwargs)


def _kangaroo(model: Any, input_ids: torch.LongTensor, kwargs: dict[str, Any]):
    output = model.generate(input_ids, use_kangaroo=True, **kwargs)
    return output, model.last_generate_stats


BATCH_METHODS: dict[str, BatchRunner] = {
    "vanilla": _vanilla,
    "vanilla_cpu_kernels": _vanilla_cpu_kernels,
    "kangaroo": _kangaroo,
}


def left_padded(prompts: list[torch.LongTensor], pad_token_id: int) -> tuple[torch.LongTensor, torch.LongTensor]:
    """Prompts (1, T_i) as one left-padded batch (B, max T_i) and its attention mask."""
    width = max(prompt.shape[1] for prompt in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - prompt.shape[1] :] = prompt[0]
        attention_mask[row, width - prompt.shape[1] :] = 1
    return input_ids, attention_mask


def _rows(output: torch.LongTensor, prompt_width: int, eos_token_ids: set[int]) -> list[list[int]]:
    """Each row's new tokens, up to and including its first EOS (the padding after it is not generated work)."""
    rows = []
    for row in output[:, prompt_width:].tolist():
        end = next((i + 1 for i, token in enumerate(row) if token in eos_token_ids), len(row))
        rows.append(row[:end])
    return rows


def run_batched_benchmark(
    model: Any,
    tokenizer: Any,
    questions: list[Question],
    output_dir: str | Path,
    batch_sizes: list[int],
    methods: tuple[str, ...] = tuple(BATCH_METHODS),
    max_new_tokens: int = 128,
    repeats: int = 1,
    warmup: bool = True,
    description: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Benchmark `methods` at every batch size; write `batch_results.json`, `batch_results.md` and
    `batch_speedup.png` into `output_dir`; return the results."""
    from tqdm.auto import tqdm

    from ..loading import chat_input_ids

    unknown = [name for name in methods if name not in BATCH_METHODS]
    if unknown or "vanilla" not in methods:
        raise ValueError(f"Batched benchmark methods are {sorted(BATCH_METHODS)} (vanilla included), got {methods}.")
    if not batch_sizes or min(batch_sizes) < 1:
        raise ValueError(f"batch sizes must be >= 1, got {batch_sizes}.")
    count = len(questions) // max(batch_sizes) * max(batch_sizes)
    if count == 0:
        raise ValueError(f"{len(questions)} questions cannot fill one batch of {max(batch_sizes)}.")
    questions = questions[:count]
    prompts = [chat_input_ids(tokenizer, question.turns[0]) for question in questions]
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = model.generation_config.eos_token_id
    eos_token_ids = set([eos] if isinstance(eos, int) else eos or [])
    kwargs = {"do_sample": False, "max_new_tokens": max_new_tokens, "pad_token_id": pad_token_id}
    probe, tolerance = GapProbe(model.get_base_model()), default_tie_tolerance(model.dtype)

    def run_chunk(batch_size: int, start: int, timed: bool, totals: dict[str, Any], shift: int) -> None:
        input_ids, attention_mask = left_padded(prompts[start : start + batch_size], pad_token_id)
        call = {**kwargs, "attention_mask": attention_mask}
        outputs: dict[str, list[list[int]]] = {}
        for name in methods[shift:] + methods[:shift]:
            times = []
            for _ in range(repeats if timed else 1):
                start_time = time.perf_counter()
                output, stats = BATCH_METHODS[name](model, input_ids, call)
                times.append(time.perf_counter() - start_time)
            outputs[name] = _rows(output, input_ids.shape[1], eos_token_ids)
            if timed:
                totals[name]["time_s"] += statistics.median(times)
                totals[name]["new_tokens"] += sum(len(row) for row in outputs[name])
                if stats is not None:
                    totals[name]["steps"] += stats.verify_steps
                    totals[name]["row_taus"] += [row.mean_accepted_tokens for row in (stats.rows or [stats])]
        if timed:
            for name, rows in outputs.items():
                for index, (ours, reference) in enumerate(zip(rows, outputs["vanilla"], strict=True)):
                    position = first_divergence(reference, ours)
                    if position is None:
                        totals[name]["identical_rows"] += 1
                    elif position < min(len(reference), len(ours)):  # a numerical tie of the base, or a failure
                        gap, _ = tie_gap(probe, prompts[start + index], reference, position, ours[position])
                        totals[name]["tie_rows" if classify_divergence(gap, tolerance) else "failed_rows"] += 1
                    else:
                        totals[name]["failed_rows"] += 1

    results: dict[str, Any] = {"batch_sizes": {}, "prompts": count}
    bar = tqdm(total=sum(count // b for b in batch_sizes), desc="bench batches", unit="batch", disable=not progress)
    for batch_size in batch_sizes:
        zero = {"time_s": 0.0, "new_tokens": 0, "steps": 0, "identical_rows": 0, "tie_rows": 0, "failed_rows": 0}
        totals = {name: {**zero, "row_taus": []} for name in methods}
        if warmup:
            run_chunk(batch_size, 0, False, totals, 0)
        for chunk, start in enumerate(range(0, count, batch_size)):
            run_chunk(batch_size, start, True, totals, chunk % len(methods))
            bar.update()
        results["batch_sizes"][str(batch_size)] = _summarize(totals, count)
    bar.close()
    _compare_taus_with_batch_one(results)
    results["lossless"] = all(
        summary["failed_rows"] == 0 for sizes in results["batch_sizes"].values() for summary in sizes.values()
    )
    results["settings"] = {
        "dtype": str(model.dtype).removeprefix("torch."),
        "tie_tolerance": tolerance,
        "max_new_tokens": max_new_tokens,
        "repeats": repeats,
        "methods": list(methods),
        "exit_layer": model.config.exit_layer,
        "draft_threshold": model.config.draft_threshold,
        "max_draft_tokens": model.config.max_draft_tokens,
        **(description or {}),
    }
    results["machine"] = machine_info(str(model.device))
    write_batched_reports(results, Path(output_dir))
    return results


def _summarize(totals: dict[str, dict[str, Any]], prompts: int) -> dict[str, Any]:
    summary = {}
    reference = totals["vanilla"]["new_tokens"] / totals["vanilla"]["time_s"]
    for name, total in totals.items():
        throughput = total["new_tokens"] / total["time_s"]
        summary[name] = {
            "tokens_per_second": throughput,
            "speedup": throughput / reference,
            "new_tokens": total["new_tokens"],
            "time_s": total["time_s"],
            "identical_fraction": total["identical_rows"] / prompts,
            "tie_rows": total["tie_rows"],  # differ from vanilla first where the base's two tokens tie
            "failed_rows": total["failed_rows"],  # differ by more than a numerical tie: not lossless
        }
        if total["row_taus"]:
            summary[name]["mean_accepted_tokens"] = total["new_tokens"] / total["steps"] if total["steps"] else None
            summary[name]["row_taus"] = total["row_taus"]
    return summary


def _compare_taus_with_batch_one(results: dict[str, Any]) -> None:
    """Each row's tau at batch B minus the same prompt's tau at batch 1 (when both were measured)."""
    alone = results["batch_sizes"].get("1", {}).get("kangaroo", {}).get("row_taus")
    if not alone:
        return
    for summary in results["batch_sizes"].values():
        taus = summary.get("kangaroo", {}).get("row_taus")
        if taus:
            gaps = [batched - single for batched, single in zip(taus, alone, strict=True)]
            summary["kangaroo"]["tau_gap_vs_batch_1"] = {
                "mean": statistics.fmean(gaps),
                "mean_abs": statistics.fmean(abs(gap) for gap in gaps),
                "max_abs": max(abs(gap) for gap in gaps),
            }


def render_batched_markdown(results: dict[str, Any]) -> str:
    settings, machine = results["settings"], results["machine"]
    methods = settings["methods"]
    lines = [
        f"# Batched decoding: {settings['dtype']}, {results['prompts']} prompts, "
        f"{settings['max_new_tokens']} new tokens",
        "",
        f"Machine: {machine.get('cpu_model')}, {machine.get('usable_cpus')} usable cores, torch "
        f"{machine.get('torch')} ({machine.get('torch_threads')} threads), transformers "
        f"{machine.get('transformers')}, {machine.get('date')}.",
        "",
        "| batch | " + " | ".join(f"{name} tok/s" for name in methods) + " | kangaroo / vanilla | kangaroo / "
        "vanilla_cpu_kernels | τ | identical rows (+ numerical ties) | τ gap vs batch 1 (mean abs) |",
        "|---:|" + "---:|" * (len(methods) + 5),
    ]
    for batch_size, summary in results["batch_sizes"].items():
        kangaroo = summary.get("kangaroo", {})
        kernels = summary.get("vanilla_cpu_kernels")
        gap = kangaroo.get("tau_gap_vs_batch_1")
        cells = [f"{summary[name]['tokens_per_second']:.1f}" for name in methods]
        cells += [
            f"{kangaroo['speedup']:.2f}x" if kangaroo else "-",
            f"{kangaroo['tokens_per_second'] / kernels['tokens_per_second']:.2f}x" if kangaroo and kernels else "-",
            f"{kangaroo['mean_accepted_tokens']:.2f}" if kangaroo.get("mean_accepted_tokens") else "-",
            f"{kangaroo['identical_fraction']:.0%} (+{kangaroo['tie_rows']})" if kangaroo else "-",
            f"{gap['mean_abs']:.3f}" if gap else "-",
        ]
        lines.append(f"| {batch_size} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Lossless: "
        + (
            "every row equals the base's batched output, or first differs where the base's two tokens tie "
            f"(logit gap <= {settings['tie_tolerance']})."
            if results["lossless"]
            else "NO: some rows differ by more than a tie."
        ),
    ]
    return "\n".join(lines) + "\n"


def plot_batched(results: dict[str, Any], path: Path) -> None:
    """Tokens per second against batch size, one line per method."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: %s not written.", path)
        return
    sizes = [int(b) for b in results["batch_sizes"]]
    figure, axis = plt.subplots(figsize=(6, 4))
    for name in results["settings"]["methods"]:
        axis.plot(sizes, [results["batch_sizes"][str(b)][name]["tokens_per_second"] for b in sizes], "o-", label=name)
    axis.set_xscale("log", base=2)
    axis.set_xticks(sizes, [str(b) for b in sizes])
    axis.set_xlabel("batch size")
    axis.set_ylabel("new tokens per second")
    axis.set_title(f"Batched decoding, {results['settings']['dtype']}")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_batched_reports(results: dict[str, Any], output_dir: Path) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "batch_results.json").write_text(json.dumps(results, indent=2) + "\n")
    (output_dir / "batch_results.md").write_text(render_batched_markdown(results))
    plot_batched(results, output_dir / "batch_speedup.png")


__all__ = ["BATCH_METHODS", "left_padded", "render_batched_markdown", "run_batched_benchmark"]
