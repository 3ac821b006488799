"""Reports of `kangaroo-hf bench`: `results.json`, `results.md`, `speedup.png` and `acceptance.png`.

`results.json` (schema_version 1):

- `settings`: model, questions, dtype, device, lengths, sampling, methods and their options, tie tolerance, Kangaroo's
  exit layer and draft stop rule; `machine`: platform, CPU, cores, torch threads, library versions, date.
- `methods.<name>.overall` and `methods.<name>.by_category.<category>`: `speedup` (the method's tokens per second over
  the base's `generate()` tokens per second, same prompts: the time ratio when outputs have the same length, and still
  per token when they do not, e.g. bfloat16 outputs that end earlier after a near-tie), `tokens_per_second`,
  `new_tokens`, `time_s`, `prompts`, `identical_fraction` (greedy),
  and for speculative methods `mean_accepted_tokens` (tokens per verification step, tau), `verify_steps`,
  `acceptance_by_position`, `drafted_by_position`, `accepted_by_position`; `methods.<name>.lossless`.
- `lossless`, `identical_fraction`, `numerical_ties`, `failures`, `divergences` (greedy; null when sampling).
- `per_prompt`: each question's prompt length and every method's time, tokens and identity.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import os
import platform
from pathlib import Path
from typing import Any

from ..core.stats import KangarooStats
from .losslessness import Divergence
from .methods import REFERENCE_METHOD, MethodRun, PromptRecord

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """Where the numbers were measured: platform, CPU model, cores, torch threads, versions, date (UTC)."""
    import torch
    import transformers

    from ..core.version import __version__

    cpu_model = platform.processor() or None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "kangaroo_hf": __version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["accelerator"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _aggregate(runs: list[MethodRun], reference: list[MethodRun], greedy: bool) -> dict[str, Any]:
    """Totals of one method over some prompts; `reference` are the base's runs on the same prompts."""
    time_s = sum(run.time_s for run in runs)
    new_tokens = sum(len(run.tokens) for run in runs)
    reference_time = sum(run.time_s for run in reference)
    reference_tokens = sum(len(run.tokens) for run in reference)
    rate = new_tokens / time_s if time_s > 0 else None
    reference_rate = reference_tokens / reference_time if reference_time > 0 else None
    summary: dict[str, Any] = {
        "speedup": rate / reference_rate if rate is not None and reference_rate else None,
        "tokens_per_second": rate,
        "new_tokens": new_tokens,
        "time_s": time_s,
        "prompts": len(runs),
        "identical_fraction": sum(bool(run.identical) for run in runs) / len(runs) if greedy and runs else None,
    }
    counts = [run.counts for run in runs if run.counts is not None]
    if counts:
        total = KangarooStats()
        for item in counts:
            total.add(item)
        summary.update(
            mean_accepted_tokens=total.mean_accepted_tokens,
            verify_steps=total.verify_steps,
            acceptance_by_position=total.acceptance_rate_by_position,
            drafted_by_position=list(total.drafted_by_position),
            accepted_by_position=list(total.accepted_by_position),
        )
    return summary


def build_results(
    records: list[PromptRecord], divergences: list[Divergence], methods: tuple[str, ...], settings: dict[str, Any]
) -> dict[str, Any]:
    """The content of `results.json` from every prompt's runs and the divergences found."""
    greedy = not settings.get("do_sample", False)
    categories = list(dict.fromkeys(record.question.category for record in records))

    def summary(name: str, selected: list[PromptRecord]) -> dict[str, Any]:
        reference = [record.runs[REFERENCE_METHOD] for record in selected]
        return _aggregate([record.runs[name] for record in selected], reference, greedy)

    failures = [item for item in divergences if not item.tie]
    method_results = {}
    for name in methods:
        method_results[name] = {
            "overall": summary(name, records),
            "by_category": {
                category: summary(name, [record for record in records if record.question.category == category])
                for category in categories
            },
            "lossless": None if not greedy else not any(item.method == name for item in failures),
        }
    compared = [run for record in records for name, run in record.runs.items() if name != REFERENCE_METHOD]
    identical_fraction = None
    if greedy:
        identical_fraction = sum(bool(run.identical) for run in compared) / len(compared) if compared else 1.0
    return {
        "schema_version": SCHEMA_VERSION,
        "settings": settings,
        "machine": machine_info(str(settings.get("device", "cpu"))),
        "num_prompts": len(records),
        "categories": categories,
        "methods": method_results,
        "lossless": (not failures) if greedy else None,
        "identical_fraction": identical_fraction,
        "numerical_ties": sum(item.tie for item in divergences) if greedy else None,
        "failures": len(failures) if greedy else None,
        "divergences": [dataclasses.asdict(item) for item in divergences],
        "per_prompt": [
            {
                "question_id": record.question.question_id,
                "category": record.question.category,
                "prompt_tokens": record.prompt_tokens,
                "runs": {
                    name: {
                        "time_s": run.time_s,
                        "new_tokens": len(run.tokens),
                        "identical": run.identical,
                        "mean_accepted_tokens": run.counts.mean_accepted_tokens if run.counts else None,
                    }
                    for name, run in record.runs.items()
                },
            }
            for record in records
        ],
    }


def _speculative(results: dict[str, Any]) -> list[str]:
    return [name for name, item in results["methods"].items() if "mean_accepted_tokens" in item["overall"]]


def _compared(results: dict[str, Any]) -> list[str]:
    return [name for name in results["methods"] if name != REFERENCE_METHOD]


def _cell(summary: dict[str, Any]) -> str:
    speedup = f"{summary['speedup']:.2f}x" if summary["speedup"] is not None else "n/a"
    if "mean_accepted_tokens" in summary:
        return f"{speedup} (τ {summary['mean_accepted_tokens']:.2f})"
    return speedup


def render_markdown(results: dict[str, Any]) -> str:
    """`results.md`: speedup and tau per category and method, throughput, acceptance by position, losslessness."""
    settings, machine, methods = results["settings"], results["machine"], results["methods"]
    compared = _compared(results)
    mode = "greedy" if not settings.get("do_sample") else f"sampling (temperature {settings.get('temperature')})"
    lines = [
        "# Kangaroo benchmark (Spec-Bench)",
        "",
        f"Model: {settings.get('model', settings.get('base_model'))}; exit layer {settings['exit_layer']}, "
        f"draft threshold {settings['draft_threshold']}, max draft tokens {settings['max_draft_tokens']}.  ",
        f"{results['num_prompts']} prompts (first turn, chat template), {mode}, max_new_tokens "
        f"{settings['max_new_tokens']}, {settings['dtype']} on {settings['device']}, warm-up {settings['warmup']}; "
        f"{settings['order']}.  ",
        f"Machine: {machine.get('accelerator') or machine['cpu_model']}, {machine['usable_cpus']} usable cores, "
        f"torch {machine['torch']} ({machine['torch_threads']} threads), transformers {machine['transformers']}, "
        f"kangaroo_hf {machine['kangaroo_hf']}, {machine['date']}.  ",
        "Kernels: " + "; ".join(f"{name}: {kernels}" for name, kernels in settings.get("kernels", {}).items()) + ".",
        "",
        "## Speedup over the base's `generate()` (τ: mean tokens per verification step)",
        "",
        "| category | prompts | " + " | ".join(compared) + " |",
        "|---|---:|" + "---:|" * len(compared),
    ]
    reference = methods[REFERENCE_METHOD]
    for category in results["categories"]:
        cells = [_cell(methods[name]["by_category"][category]) for name in compared]
        lines.append(f"| {category} | {reference['by_category'][category]['prompts']} | " + " | ".join(cells) + " |")
    cells = [f"**{_cell(methods[name]['overall'])}**" for name in compared]
    lines.append(f"| **overall** | {reference['overall']['prompts']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Throughput",
        "",
        "| method | speedup | tokens/s | new tokens | time (s) | τ | identical to vanilla |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, item in methods.items():
        overall = item["overall"]
        tau = f"{overall['mean_accepted_tokens']:.2f}" if "mean_accepted_tokens" in overall else "-"
        identical = "-" if overall["identical_fraction"] is None else f"{overall['identical_fraction']:.0%}"
        lines.append(
            f"| {name} | {overall['speedup']:.2f}x | {overall['tokens_per_second']:.1f} | {overall['new_tokens']} | "
            f"{overall['time_s']:.2f} | {tau} | {identical} |"
        )
    speculative = _speculative(results)
    if speculative:
        width = max(len(methods[name]["overall"]["acceptance_by_position"]) for name in speculative)
        lines += [
            "",
            "## Acceptance rate by draft position (accepted / drafted at that position)",
            "",
            "| method | " + " | ".join(str(i + 1) for i in range(width)) + " |",
            "|---|" + "---:|" * width,
        ]
        for name in speculative:
            overall = methods[name]["overall"]
            pairs = zip(overall["acceptance_by_position"], overall["drafted_by_position"], strict=True)
            cells = [f"{rate:.2f}" if drafted else "-" for rate, drafted in pairs]
            lines.append(f"| {name} | " + " | ".join(cells + ["-"] * (width - len(cells))) + " |")
    lines += ["", "## Losslessness", ""]
    if results["lossless"] is None:
        lines.append("Sampling: outputs are not compared with the base's (only their distribution is the same).")
    else:
        verdict = "yes" if results["lossless"] else "**NO**"
        lines.append(
            f"Lossless: {verdict}. Outputs identical to vanilla: {results['identical_fraction']:.1%}; "
            f"{results['numerical_ties']} numerical tie(s) (base logit gap <= {settings['tie_tolerance']}), "
            f"{results['failures']} failure(s)."
        )
    if results["divergences"]:
        lines += [
            "",
            "| method | question | category | token | vanilla | method | logit gap | top-2 gap | float32 gap "
            "| verdict |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for item in results["divergences"]:
            gaps = [
                "-" if item[key] is None else f"{item[key]:.4g}"
                for key in ("logit_gap", "top2_gap", "logit_gap_float32")
            ]
            lines.append(
                f"| {item['method']} | {item['question_id']} | {item['category']} | {item['position']} | "
                f"{item['reference_token']} | {item['method_token']} | " + " | ".join(gaps) + " | "
                f"{'tie' if item['tie'] else '**failure**'} |"
            )
    return "\n".join(lines) + "\n"


def plot_speedup(results: dict[str, Any], path: Path) -> None:
    """Grouped bars: speedup per category (and overall) for every method but the reference."""
    from matplotlib.figure import Figure  # no pyplot: an Agg canvas, no global backend state

    compared = _compared(results)
    groups = [*results["categories"], "overall"]
    figure = Figure(figsize=(max(6.0, 0.9 * len(groups) + 2), 4.5), layout="constrained")
    axes = figure.add_subplot()
    width = 0.8 / max(1, len(compared))
    for offset, name in enumerate(compared):
        item = results["methods"][name]
        values = [item["by_category"][group]["speedup"] for group in results["categories"]]
        values.append(item["overall"]["speedup"])
        positions = [index + (offset - (len(compared) - 1) / 2) * width for index in range(len(groups))]
        axes.bar(positions, [value or 0.0 for value in values], width, label=name)
    axes.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    axes.set_xticks(range(len(groups)), groups, rotation=30, ha="right")
    axes.set_ylabel("speedup over base generate()")
    settings = results["settings"]
    axes.set_title(f"Spec-Bench speedup ({settings['dtype']}, {settings['device']}, {results['num_prompts']} prompts)")
    if compared:
        axes.legend()
    figure.savefig(path, dpi=120)


def plot_acceptance(results: dict[str, Any], path: Path) -> None:
    """Acceptance rate by draft position, one line per speculative method."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.0, 4.0), layout="constrained")
    axes = figure.add_subplot()
    speculative = _speculative(results)
    for name in speculative:
        overall = results["methods"][name]["overall"]
        points = [
            (position + 1, rate)
            for position, (rate, drafted) in enumerate(
                zip(overall["acceptance_by_position"], overall["drafted_by_position"], strict=True)
            )
            if drafted
        ]
        if points:
            axes.plot(
                *zip(*points, strict=True), marker="o", label=f"{name} (τ {overall['mean_accepted_tokens']:.2f})"
            )
    if not speculative:
        axes.text(0.5, 0.5, "no speculative method", ha="center", va="center", transform=axes.transAxes)
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.set_xlabel("draft position")
    axes.set_ylabel("acceptance rate")
    axes.set_ylim(0, 1.02)
    axes.set_title("Acceptance rate by draft position")
    if speculative:
        axes.legend()
    figure.savefig(path, dpi=120)


def write_reports(results: dict[str, Any], output_dir: Path) -> None:
    """Write `results.json`, `results.md`, `speedup.png` and `acceptance.png` into `output_dir`."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (output_dir / "results.md").write_text(render_markdown(results), encoding="utf-8")
    plot_speedup(results, output_dir / "speedup.png")
    plot_acceptance(results, output_dir / "acceptance.png")
    logger.info("Reports written to %s", output_dir)


def format_summary(results: dict[str, Any], output_dir: Path) -> str:
    """A few lines for the terminal: each method's overall speedup, throughput, tau and losslessness."""
    lines = []
    for name, item in results["methods"].items():
        overall = item["overall"]
        tau = f", τ {overall['mean_accepted_tokens']:.2f}" if "mean_accepted_tokens" in overall else ""
        identical = "" if overall["identical_fraction"] is None else f", identical {overall['identical_fraction']:.0%}"
        lines.append(
            f"{name:>10}: {overall['speedup']:.2f}x, {overall['tokens_per_second']:.1f} tokens/s{tau}{identical}"
        )
    if results["lossless"] is not None:
        lines.append(
            f"lossless: {results['lossless']} ({results['numerical_ties']} numerical ties, "
            f"{results['failures']} failures)"
        )
    lines.append(f"reports: {output_dir / 'results.md'}, {output_dir / 'results.json'}")
    return "\n".join(lines)


__all__ = [
    "build_results",
    "format_summary",
    "machine_info",
    "plot_acceptance",
    "plot_speedup",
    "render_markdown",
    "write_reports",
]
