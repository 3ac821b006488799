"""Self-distil the training prompts and train adapter variants for the embedded SmolLM2, on one accelerator.

This is how the shipped adapter was produced (see its `training_args.json`). Two steps, from the repository root:

    # 1. anywhere: pick a seeded, source-balanced mix of ../shared/data/train and hold out a validation split
    python scripts/adapter_search.py prepare --data-dir ../shared/data --out runs/search-data
    # 2. on a GPU (CPU works, slowly): distil, train every variant, evaluate; results appear as stages finish
    python scripts/adapter_search.py run --data runs/search-data --out runs/search --budget-s 480

Run 3 in docs/adapter_search (the shipped adapter's first stage) kept run 2's answers and validation split and
distilled more:

    python scripts/adapter_search.py prepare --data-dir ../shared/data --keep-validation runs/search-data \
        --out runs/search-data-all
    python scripts/adapter_search.py run --data runs/search-data-all --out runs/search3 --epochs 5 \
        --resume-answers docs/adapter_search/self_distilled_answers.jsonl.gz --distill-s 170 --variants e2_exit_mlp2

Run 5 (`--variants continue_shipped`) trained the shipped adapter further on more distilled answers the same way.
`--answers` and `--resume-answers` take several files, e.g. both answer files in docs/adapter_search (run 7's
CPU-distilled answers, `self_distilled_answers_run7_cpu.jsonl.gz`, are a file of their own).

`run` writes into `--out`: `answers.jsonl.gz` (the base's own answers), `<variant>.tar.gz` (each variant's
`save_pretrained` folder), `results.json` (validation metrics, simulated tau on the Spec-Bench reference answers per
category, timings) and `log.txt`. Every stage respects the time budget, so a run cut short still leaves its findings.
Spec-Bench is used for evaluation only: its prompts are never trained on.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import logging
import shutil
import sys
import tarfile
import time
import traceback
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from kangaroo_hf import load_embedded_base
from kangaroo_hf.default_model import SHIPPED_ADAPTER
from kangaroo_hf.training import TrainingArguments, prepare_model, train_adapter
from kangaroo_hf.training.data import (
    EncodedConversation,
    SelfDistillArguments,
    encode_conversations,
    load_conversations,
    self_distill,
    split_validation,
)
from kangaroo_hf.training.features import OnlineFeatures
from kangaroo_hf.training.loss import evaluate_adapter

logger = logging.getLogger("adapter_search")

# Conversations per training file: every kind of prompt represented, the large sources capped.
MIX = {
    "flan_cot": 3500,
    "gpteacher_codegen": 3000,
    "gpteacher_roleplay": 1923,
    "gpteacher_toolformer": 1000,
    "gsm8k_train": 3500,
    "hh_rlhf_harmless_base_test": 2307,
    "self_instruct_seed_and_user_tasks": 427,
    "t0_train_50k_subset": 5000,
}
VALIDATION_SIZE = 400

# name -> TrainingArguments overrides. Ordered by priority: a short budget trains the first ones only.
VARIANTS = {
    "e2_final_mlp": dict(exit_layer=2, adapter_context="final", adapter_mlp=True),
    "e2_final_attn": dict(exit_layer=2, adapter_context="final"),
    "e2_exit_attn": dict(exit_layer=2),  # the paper's adapter, self-distilled data
    "e2_exit_attn_dataset": dict(exit_layer=2, dataset_answers=True),  # the paper's adapter, dataset answers
    "e1_final_mlp": dict(exit_layer=1, adapter_context="final", adapter_mlp=True),
    "e2_exit_mlp": dict(exit_layer=2, adapter_mlp=True),
    "e2_exit_mlp2": dict(exit_layer=2, adapter_mlp=True, adapter_num_layers=2),  # two full decoder layers
    # the shipped adapter trained further (its shape and draft vocabulary apply), from a lower peak learning rate
    "continue_shipped": dict(init_adapter=str(SHIPPED_ADAPTER), learning_rate=6e-4),
}
# Variants whose weights come back (the others report metrics only), to keep the returned files few and small.
SHIPPABLE = ("e2_final_mlp", "e2_final_attn", "e2_exit_attn", "e1_final_mlp", "e2_exit_mlp2", "continue_shipped")
COMMON = dict(
    max_length=2048,
    draft_vocab_size=8192,
    online_features=True,
    extraction_dtype="float32",
    extraction_batch_tokens=65536,
    shard_tokens=1_048_576,
    batch_tokens=32768,
    learning_rate=2e-3,
    warmup_ratio=0.05,
    mixed_precision="bf16",
    loss_chunk_tokens=8192,
    logging_steps=50,
    eval_thresholds=[0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7],
)


def prepare(args: argparse.Namespace) -> None:
    train_dir = Path(args.data_dir) / "train"
    if args.keep_validation:
        # Every conversation of every source for training, minus an earlier run's validation split (kept as is,
        # so metrics stay comparable and answers distilled for it are never trained on).
        validation = _read_gz(Path(args.keep_validation) / "validation.jsonl.gz")
        held_out = {c["id"] for c in validation}
        every = load_conversations(sorted(train_dir.glob("*.jsonl")), seed=1)
        train = [c for c in every if c["id"] not in held_out]
    else:
        conversations = []
        for name, count in MIX.items():
            conversations += load_conversations([train_dir / f"{name}.jsonl"], max_examples_per_source=count, seed=1)
        train, validation = split_validation(conversations, VALIDATION_SIZE, seed=0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, split in (("train", train), ("validation", validation)):
        with gzip.open(out / f"{name}.jsonl.gz", "wt", encoding="utf-8") as handle:
            handle.writelines(json.dumps(c, ensure_ascii=False) + "\n" for c in split)
    if args.reference:
        shutil.copy(args.reference, out / "spec_bench_reference.jsonl")
    print(f"{len(train)} training and {len(validation)} validation conversations in {out}")


def _read_gz(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def _describe(sequences: list[EncodedConversation]) -> dict[str, int]:
    return {
        "sequences": len(sequences),
        "tokens": sum(len(s.input_ids) for s in sequences),
        "answer_tokens": sum(sum(s.assistant_mask) for s in sequences),
    }


class Run:
    """One `run`: load, distil (or reuse answers), encode, then train and evaluate each variant within the budget."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.started = args, time.time()
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.results: dict = {"device": "cpu", "stages": {}, "variants": {}}
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            self.results["device"] = torch.cuda.get_device_name()

    def left(self) -> float:
        return self.args.budget_s - (time.time() - self.started)

    def save(self) -> None:
        (self.out / "results.json").write_text(json.dumps(self.results, indent=2))

    def stage(self, name: str, seconds: float) -> None:
        self.results["stages"][name] = round(seconds, 1)
        logger.info("stage %s took %.1f s (%.0f s left)", name, seconds, self.left())
        self.save()

    def load(self) -> None:
        start = time.time()
        self.base, self.tokenizer = load_embedded_base(torch.float32)
        self.base.to(self.device).eval()
        self.stage("load", time.time() - start)

    def distill(self) -> None:
        """The base's greedy answers (bfloat16, batched) to as many training prompts as the time allows."""
        start, data = time.time(), Path(self.args.data)
        held_out = _read_gz(data / "validation.jsonl.gz")
        validation = held_out[: self.args.validation_conversations]
        conversations = validation + _read_gz(data / "train.jsonl.gz")  # validation first: always distilled
        self.dataset = {c["id"]: c for c in held_out + conversations}
        self.validation_ids = {c["id"] for c in validation}
        self.held_out_ids = {c["id"] for c in held_out}  # never trained on, even when not validated on
        if self.args.answers:  # reuse earlier answers (e.g. docs/adapter_search/self_distilled_answers.jsonl.gz)
            self.answers = [c for path in self.args.answers for c in _read_gz(Path(path))]
            self.results["distillation"] = {"conversations": len(self.answers), "reused": self.args.answers}
            self.stage("distill", time.time() - start)
            return
        answers_path = self.work / "answers.jsonl"
        answers_path.unlink(missing_ok=True)
        if self.args.resume_answers:  # earlier answers are kept; only conversations without one are distilled
            with open(answers_path, "w", encoding="utf-8") as handle:
                for path in self.args.resume_answers:
                    handle.writelines(json.dumps(c, ensure_ascii=False) + "\n" for c in _read_gz(Path(path)))
        # A bfloat16 copy generates (fast on GPUs); the float32 base stays untouched for the features.
        generator = copy.deepcopy(self.base).to(torch.bfloat16) if self.device == "cuda" else self.base
        settings = SelfDistillArguments(
            max_new_tokens=self.args.max_new_tokens,
            batch_size=self.args.distill_batch,
            batch_tokens=self.args.distill_batch * 640,
            max_prompt_length=1536,
            chunk_size=self.args.distill_chunk,
        )
        limit = min(len(conversations), self.args.conversations)
        for first in range(0, limit, self.args.distill_chunk):
            if time.time() - start > self.args.distill_s:
                logger.info("distillation budget spent after %d conversations", first)
                break
            self_distill(
                generator,
                self.tokenizer,
                conversations[first : min(first + self.args.distill_chunk, limit)],
                answers_path,
                settings,
            )
        del generator
        with open(answers_path, encoding="utf-8") as handle:
            self.answers = [json.loads(line) for line in handle]
        partial = self.out / "answers.jsonl.gz.partial"  # renamed when complete: other runs may wait for it
        with gzip.open(partial, "wt", encoding="utf-8") as handle:
            handle.writelines(json.dumps(c, ensure_ascii=False) + "\n" for c in self.answers)
        partial.rename(self.out / "answers.jsonl.gz")
        truncated = sum(any(m.get("truncated") for m in c["messages"]) for c in self.answers)
        self.results["distillation"] = {"conversations": len(self.answers), "truncated": truncated}
        self.stage("distill", time.time() - start)

    def encode(self) -> None:
        start = time.time()
        max_length = COMMON["max_length"]
        train = [c for c in self.answers if c["id"] not in self.held_out_ids]
        validation = [c for c in self.answers if c["id"] in self.validation_ids]
        self.sequences = {
            "train": encode_conversations(self.tokenizer, train, max_length),
            "validation": encode_conversations(self.tokenizer, validation, max_length),
        }
        self.dataset_train = [self.dataset[c["id"]] for c in train]  # encoded when a variant needs it
        self.reference = {}
        reference = Path(self.args.data) / "spec_bench_reference.jsonl"
        if reference.is_file():
            for line in reference.read_text().splitlines():
                row = json.loads(line)
                if row["category"] == "heldout":
                    continue
                ids, answer = row["prompt_ids"], row["answer_ids"]
                sequence = EncodedConversation(ids + answer, [0] * len(ids) + [1] * len(answer), row["id"])
                self.reference.setdefault(row["category"], []).append(sequence)
        self.results["data"] = {name: _describe(s) for name, s in self.sequences.items()}
        self.stage("encode", time.time() - start)

    def variant(self, name: str, overrides: dict) -> None:
        start = time.time()
        overrides = dict(overrides)
        dataset_answers = overrides.pop("dataset_answers", False)
        settings = {**COMMON, **overrides, "num_epochs": self.args.epochs, "output_dir": str(self.work / name)}
        training_args = TrainingArguments(**settings)
        scratch = prepare_model(self.base, training_args)  # only its base is used to compute features
        if dataset_answers and "dataset" not in self.sequences:
            self.sequences["dataset"] = encode_conversations(self.tokenizer, self.dataset_train, COMMON["max_length"])
            self.results["data"]["dataset"] = _describe(self.sequences["dataset"])
        layers = [training_args.exit_layer]
        features = {
            split: OnlineFeatures(
                scratch, self.sequences[split], layers, COMMON["shard_tokens"], COMMON["extraction_batch_tokens"]
            )
            for split in ("dataset" if dataset_answers else "train", "validation")
        }
        result = train_adapter(
            self.base,
            features["dataset" if dataset_answers else "train"],
            training_args,
            validation_data=features["validation"],
        )
        model = result.model.eval()
        entry = {"settings": {**overrides, "dataset_answers": dataset_answers}, "epochs": result.metrics}
        entry["spec_bench_reference"] = self.reference_metrics(model)
        entry["seconds"] = round(time.time() - start, 1)
        self.results["variants"][name] = entry
        recorded = {**training_args.to_dict(), "dataset_answers": dataset_answers, **self.results["data"]["train"]}
        model.save_pretrained(
            self.work / name,
            metrics={"epochs": result.metrics, "spec_bench_reference_simulated": entry["spec_bench_reference"]},
            training_args=recorded,
        )
        if name in SHIPPABLE:
            self.pack(name)
        self.stage(f"variant {name}", time.time() - start)

    def pack(self, name: str) -> None:
        """`<out>/<name>.tar.gz`: the checkpoint with its weights in float16 (half the size; drafts barely move)."""
        folder = self.work / name
        half = folder / "half"
        half.mkdir(exist_ok=True)
        weights = load_file(folder / "kangaroo_adapter.safetensors")
        save_file({k: v.half() if v.is_floating_point() else v for k, v in weights.items()}, half / "weights")
        with tarfile.open(self.out / f"{name}.tar.gz", "w:gz") as tar:
            for file in ("config.json", "generation_config.json", "kangaroo_metrics.json", "training_args.json"):
                tar.add(folder / file, arcname=f"{name}/{file}")
            tar.add(half / "weights", arcname=f"{name}/kangaroo_adapter.safetensors")

    def reference_metrics(self, model) -> dict:
        """Simulated greedy tau on the base's float32 Spec-Bench answers (first turns, 128 tokens), per category."""
        if not self.reference:
            return {}
        thresholds = COMMON["eval_thresholds"]
        layers = [model.config.exit_layer]
        every = [s for sequences in self.reference.values() for s in sequences]
        metrics = {"overall": evaluate_adapter(model, OnlineFeatures(model, every, layers), 65536, 8192, thresholds)}
        for category, sequences in self.reference.items():
            found = evaluate_adapter(model, OnlineFeatures(model, sequences, layers), 65536, 8192, thresholds)
            metrics[category] = {
                "top1_agreement": round(found["top1_agreement"], 4),
                "simulated_tau": found["simulated_tau"],
            }
        return metrics

    def main(self) -> None:
        self.load()
        self.distill()
        self.encode()
        last = 0.0
        for name in self.args.variants or VARIANTS:
            if self.left() < last * 1.1 + 10:
                logger.info("skipping %s: %.0f s left, the last variant took %.0f s", name, self.left(), last)
                self.results["variants"][name] = {"skipped": "time budget"}
                continue
            start = time.time()
            try:
                self.variant(name, VARIANTS[name])
            except Exception:  # noqa: BLE001 - one broken variant must not lose the others' results
                self.results["variants"][name] = {"error": traceback.format_exc()}
                logger.exception("variant %s failed", name)
                self.save()
            last = time.time() - start
        self.results["total_seconds"] = round(time.time() - self.started, 1)
        self.save()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    prep = commands.add_parser("prepare", help="pick the training mix and the validation split")
    prep.add_argument("--data-dir", default="../shared/data")
    prep.add_argument("--reference", default=None, help="JSONL of the base's float32 Spec-Bench answers (eval only)")
    prep.add_argument("--out", required=True)
    prep.add_argument(
        "--keep-validation", default=None, help="earlier `prepare` folder whose validation split to keep"
    )
    run = commands.add_parser("run", help="distil, train the variants, evaluate")
    run.add_argument("--data", required=True, help="folder written by `prepare`")
    run.add_argument("--out", required=True)
    run.add_argument("--work", default="runs/search-work", help="scratch folder (answers, checkpoints)")
    run.add_argument("--budget-s", type=float, default=480)
    run.add_argument(
        "--answers",
        nargs="+",
        default=None,
        help="self-distilled answers (.jsonl.gz files) to reuse instead of distilling",
    )
    run.add_argument(
        "--resume-answers",
        nargs="+",
        default=None,
        help="self-distilled answers (.jsonl.gz files) to keep; the rest is distilled",
    )
    run.add_argument("--distill-s", type=float, default=150, help="time for self-distillation")
    run.add_argument("--conversations", type=int, default=10**9, help="at most this many conversations distilled")
    run.add_argument("--validation-conversations", type=int, default=VALIDATION_SIZE)
    run.add_argument("--distill-batch", type=int, default=1024)
    run.add_argument("--distill-chunk", type=int, default=2048)
    run.add_argument("--max-new-tokens", type=int, default=256)
    run.add_argument("--epochs", type=int, default=3)
    run.add_argument("--variants", nargs="*", choices=list(VARIANTS))
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args)
        return
    Path(args.out).mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(name)s %(message)s",
        handlers=[logging.StreamHandler(sys.stdout), logging.FileHandler(Path(args.out) / "log.txt")],
    )
    Run(args).main()


if __name__ == "__main__":
    main()
