"""Write the "measured" block of a checkpoint's `kangaroo_metrics.json` from `kangaroo-hf bench` results, and re-render
its model card.

    python scripts/update_measured.py src/kangaroo_hf/pretrained/smollm2-135m-instruct \\
        --float32 docs/benchmarks/fp32 --bfloat16 docs/benchmarks/bf16

Each results folder holds a bench run's `results.json` (one question per category, 128 new tokens, greedy, batch 1).
Speed-ups of the other methods the run had (`pld`, `early_exit`, `vanilla_cpu_kernels`, `pld_cpu_kernels`;
reports written under the earlier names `vanilla_few_row`, `pld_few_row` are read as these) are recorded
beside Kangaroo's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from kangaroo_hf.bench.methods import resolve_method
from kangaroo_hf.core.checkpoint import METRICS_NAME
from kangaroo_hf.hub.model_card import write_model_card

OTHER_METHODS = ("pld", "early_exit", "vanilla_cpu_kernels", "pld_cpu_kernels")


def measured_block(results: dict[str, Any]) -> dict[str, Any]:
    """One dtype's entry: Kangaroo's overall and per-category speed-up and tau, and the other methods' speed-ups."""
    settings, machine = results["settings"], results["machine"]
    kangaroo = results["methods"]["kangaroo"]
    per_category = settings.get("limit_per_category") or 1
    block = {
        "setting": (
            f"first turns, {per_category} question{'s' if per_category > 1 else ''} per category, "
            f"{settings['max_new_tokens']} new tokens, greedy, batch 1, {settings['dtype']} on {machine['cpu_model']} "
            f"({machine['usable_cpus']} cores, torch {machine['torch']}), {machine['date'][:10]}"
            + (f", median of {settings['repeats']} timings per prompt" if settings.get("repeats", 1) > 1 else "")
        ),
        "speedup_over_plain": round(kangaroo["overall"]["speedup"], 3),
        "mean_accepted_tokens": round(kangaroo["overall"]["mean_accepted_tokens"], 3),
        "identical_fraction": round(kangaroo["overall"]["identical_fraction"], 3),
        "lossless": results["lossless"],
        "mean_accepted_tokens_by_category": {
            category: round(values["mean_accepted_tokens"], 3) for category, values in kangaroo["by_category"].items()
        },
        "speedup_by_category": {
            category: round(values["speedup"], 3) for category, values in kangaroo["by_category"].items()
        },
    }
    methods = {resolve_method(name): item for name, item in results["methods"].items()}
    for name in OTHER_METHODS:
        if name in methods:
            block[f"{name}_speedup_over_plain"] = round(methods[name]["overall"]["speedup"], 3)
    return block


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--float32", type=Path, required=True, help="bench output folder of the float32 run")
    parser.add_argument("--bfloat16", type=Path, required=True, help="bench output folder of the bfloat16 run")
    args = parser.parse_args()
    metrics_path = args.checkpoint / METRICS_NAME
    metrics = json.loads(metrics_path.read_text())
    metrics["measured"] = {
        f"spec_bench_{dtype}": measured_block(json.loads((folder / "results.json").read_text()))
        for dtype, folder in (("float32", args.float32), ("bfloat16", args.bfloat16))
    }
    metrics_path.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    write_model_card(args.checkpoint)
    for name, block in metrics["measured"].items():
        speedup, tau, lossless = block["speedup_over_plain"], block["mean_accepted_tokens"], block["lossless"]
        print(f"{name}: {speedup}x, tau {tau}, lossless {lossless}")


if __name__ == "__main__":
    main()
