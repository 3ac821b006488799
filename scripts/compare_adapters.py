"""Side-by-side speed of Kangaroo adapters and settings on held-out training-style prompts (never benchmark prompts).

    python scripts/compare_adapters.py --dtype float32 --per-source 2 \\
        --data docs/adapter_search/self_distilled_answers.jsonl.gz --limit 397 \\
        runs/search3/e2_exit_mlp2:0.5:3:3 runs/search3/e2_exit_mlp2:0.5:3:10:0:off

Each candidate is `folder:draft_threshold:max_draft_tokens:lookup_num_tokens[:lookup_max_tokens[:off]]` (`off` disables
`CpuKernels.few_row_matmul`), optionally followed by `:field=value` overrides of other config fields, e.g.
`...:0.3:3:3:lookup_max_tokens=12:lookup_trust_ngram=3`. All candidates share one base; every prompt runs plain
decoding and each candidate, in an order rotated per prompt; the speed-up is total plain time over total candidate
time, with tau and how many outputs equal plain decoding's. This produced the A/B tables in
docs/adapter_search/README.md. The first 397 conversations of `self_distilled_answers.jsonl.gz` are the held-out
validation split (`--limit 397` keeps to them).
"""

from __future__ import annotations

import argparse
import gzip
import json
import time

import torch

from kangaroo_hf import CpuKernels, KangarooForCausalLM, load_embedded_base
from kangaroo_hf.loading import chat_input_ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("candidates", nargs="+")
    parser.add_argument("--data", required=True, help="JSONL conversations (messages format); first user turns used")
    parser.add_argument("--limit", type=int, default=None, help="read only the first N conversations")
    parser.add_argument("--num-prompts", type=int, default=12, help="the first N (of those read)")
    parser.add_argument("--per-source", type=int, default=0, help="instead: the first N of every source")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args()

    base, tokenizer = load_embedded_base(getattr(torch, args.dtype))
    models = {}
    for spec in args.candidates:
        folder, threshold, drafts, lookup, *rest = spec.split(":")
        overrides = dict(part.split("=", 1) for part in rest if "=" in part)
        rest = [part for part in rest if "=" not in part]
        model = KangarooForCausalLM.from_pretrained(folder, base_model=base).eval()
        model.config.lookup_max_tokens = int(rest[0]) if rest else 0
        model.cpu_kernels = CpuKernels(few_row_matmul=not (len(rest) > 1 and rest[1] == "off"))
        for field, value in overrides.items():
            if not hasattr(model.config, field):
                raise SystemExit(f"{spec}: the config has no field {field!r}")
            current = getattr(model.config, field)
            parsed = value.lower() in ("1", "true", "on") if isinstance(current, bool) else type(current)(value)
            setattr(model.config, field, parsed)
        settings = dict(draft_threshold=float(threshold), max_draft_tokens=int(drafts), lookup_num_tokens=int(lookup))
        models[spec] = (model, settings)
    with (gzip.open if args.data.endswith(".gz") else open)(args.data, "rt", encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle][: args.limit]
    if args.per_source:
        by_source: dict[str, list[dict]] = {}
        for row in rows:
            by_source.setdefault(row["id"].rsplit("-", 1)[0], []).append(row)
        rows = [row for group in by_source.values() for row in group[: args.per_source]]
    else:
        rows = rows[: args.num_prompts]
    first_turns = [next(m["content"] for m in row["messages"] if m["role"] == "user") for row in rows]
    prompts = [chat_input_ids(tokenizer, text) for text in first_turns]
    common = dict(do_sample=False, max_new_tokens=args.max_new_tokens)
    any_model = next(iter(models.values()))[0]

    def run(name: str, input_ids: torch.Tensor) -> torch.Tensor:
        if name == "plain":
            return any_model.generate(input_ids, use_kangaroo=False, **common)
        model, settings = models[name]
        return model.generate(input_ids, **common, **settings)

    names = ["plain", *models]
    for name in names:  # warm-up
        run(name, prompts[0])
    seconds = dict.fromkeys(names, 0.0)
    tokens = {name: [0, 0] for name in models}
    identical = dict.fromkeys(models, 0)
    for index, input_ids in enumerate(prompts):
        outputs = {}
        for name in names[index % len(names) :] + names[: index % len(names)]:
            start = time.perf_counter()
            outputs[name] = run(name, input_ids)
            seconds[name] += time.perf_counter() - start
            if name != "plain":
                stats = models[name][0].last_generate_stats
                tokens[name][0] += stats.new_tokens
                tokens[name][1] += stats.verify_steps
        for name in models:
            identical[name] += int(torch.equal(outputs[name], outputs["plain"]))
    print(f"{args.dtype}, {len(prompts)} prompts, {args.max_new_tokens} new tokens")
    for name in models:
        print(
            f"{name}: {seconds['plain'] / seconds[name]:.3f}x, tau {tokens[name][0] / max(tokens[name][1], 1):.2f}, "
            f"identical {identical[name]}/{len(prompts)}"
        )


if __name__ == "__main__":
    main()
