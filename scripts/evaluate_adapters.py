"""Draft quality of SmolLM2 adapters, all measured the same way: held-out validation and Spec-Bench reference answers.

    python scripts/evaluate_adapters.py src/kangaroo_hf/pretrained/smollm2-135m-instruct runs/more \\
        runs/more/checkpoint-130/adapter_weights.safetensors

Each argument is an adapter folder (`save_pretrained`) or a training checkpoint's `adapter_weights.safetensors` (loaded
onto the shipped adapter's shape). For each, on two sets of the base's own answers, prints top-1 agreement with the
base's float32 distribution, expected acceptance `sum_v min(p, q)` and tau replayed with the adapter's own max drafts
at thresholds 0 / 0.3 / 0.5 (`distillation.evaluate_adapter`):

- validation: the first 397 conversations of `docs/adapter_search/self_distilled_answers.jsonl.gz` (held out of every
  training run);
- Spec-Bench reference: the base's float32 greedy answers (128 tokens) to the first turns of `--per-category`
  questions per category, generated here with plain decoding (evaluation only, never trained on).

Float32 features (exit and last-layer states) are built once into `--cache-dir` and reused across adapters and runs;
the run-4 table in `docs/adapter_search/README.md` was measured this way.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from kangaroo_hf import KangarooForCausalLM, load_embedded_base
from kangaroo_hf.bench.runner import find_questions_file, load_questions
from kangaroo_hf.default_model import SHIPPED_ADAPTER
from kangaroo_hf.loading import chat_input_ids
from kangaroo_hf.training.data import EncodedConversation, encode_conversations
from kangaroo_hf.training.features import FeatureCache
from kangaroo_hf.training.loss import evaluate_adapter

VALIDATION_SIZE = 397
REPORTED = ("top1_agreement", "expected_acceptance", "simulated_tau", "tokens")


def reference_answers(base, tokenizer, per_category: int, max_new_tokens: int = 128) -> list[EncodedConversation]:
    """The base's greedy answers to Spec-Bench first turns, as prompt + answer sequences (loss on the answer), with
    ids `spec_bench-<category>-<question id>`. `scripts/replay_drafting.py` replays rounds on the same answers."""
    questions = load_questions(find_questions_file(), per_category)
    sequences = []
    for question in questions:
        prompt = chat_input_ids(tokenizer, question.turns[0])
        with torch.no_grad():
            output = base.generate(
                prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new_tokens, do_sample=False
            )
        ids = output[0].tolist()
        mask = [0] * prompt.shape[1] + [1] * (len(ids) - prompt.shape[1])
        sequences.append(EncodedConversation(ids, mask, f"spec_bench-{question.category}-{question.question_id}"))
    return sequences


def load_adapter(spec: str, base) -> KangarooForCausalLM:
    if spec.endswith(".safetensors"):  # a training checkpoint's adapter weights, on the shipped adapter's shape
        model = KangarooForCausalLM.from_pretrained(SHIPPED_ADAPTER, base_model=base)
        model.load_adapter_state_dict(load_file(spec))
        return model.eval()
    return KangarooForCausalLM.from_pretrained(spec, base_model=base).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapters", nargs="+")
    parser.add_argument("--answers", default="docs/adapter_search/self_distilled_answers.jsonl.gz")
    parser.add_argument("--per-category", type=int, default=2)
    parser.add_argument("--cache-dir", default="runs/evaluation_features")
    args = parser.parse_args()

    base, tokenizer = load_embedded_base(torch.float32)
    with gzip.open(args.answers, "rt", encoding="utf-8") as handle:
        validation = [json.loads(line) for _, line in zip(range(VALIDATION_SIZE), handle, strict=False)]
    sets = {
        "validation": encode_conversations(tokenizer, validation, 2048),
        "spec_bench": reference_answers(base, tokenizer, args.per_category),
    }
    models = {spec: load_adapter(spec, base) for spec in args.adapters}  # one shared base
    layers = sorted({model.config.exit_layer for model in models.values()})
    first = next(iter(models.values()))
    caches = {
        name: FeatureCache.build(first, sequences, Path(args.cache_dir) / name, layers, storage_dtype="float32")
        for name, sequences in sets.items()
    }
    for spec, model in models.items():
        report = {}
        for name, cache in caches.items():
            metrics = evaluate_adapter(model, cache, 65536, 4096, [0.0, 0.3, 0.5])
            report[name] = {key: metrics[key] for key in REPORTED}
        print(spec, json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
