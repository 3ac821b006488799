"""Put a trained SmolLM2 adapter into the package (`kangaroo_hf/pretrained/smollm2-135m-instruct`).

    python scripts/ship_adapter.py runs/search/e2_final_mlp --threshold 0.5 --max-drafts 4 --lookup 10
    python scripts/ship_adapter.py runs/s7/out --weights-dtype int8 --threshold 0.3 --max-drafts 3 --lookup 3 \\
        --lookup-max-tokens 12 --trust-ngram 3 --metrics measured.json

Keeps the draft vocabulary the adapter was trained with (or, with `--draft-vocab N`, the N most frequent tokens of the
assistant turns in ../shared/data/train, at most `--answers-per-file` answers per file; special tokens always
included), sets the chosen draft settings, stores the weights in `--weights-dtype` (float16 keeps a one-layer adapter
under 8 MB, int8 a two-layer one; drafts are verified, so this never changes outputs), and copies the run's
`training_args.json` / `kangaroo_metrics.json` next to the weights so the model card shows them.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
from pathlib import Path

import torch

from kangaroo_hf import KangarooForCausalLM, load_embedded_base
from kangaroo_hf.core.checkpoint import WEIGHTS_DTYPES
from kangaroo_hf.default_model import SHIPPED_ADAPTER


def frequent_tokens(tokenizer, data_glob: str, size: int, answers_per_file: int) -> list[int]:
    counts: collections.Counter[int] = collections.Counter()
    for path in sorted(glob.glob(data_glob)):
        with open(path) as handle:
            for line_number, line in enumerate(handle):
                if line_number >= answers_per_file:
                    break
                for message in json.loads(line)["messages"]:
                    if message["role"] == "assistant":
                        counts.update(tokenizer(message["content"], add_special_tokens=False)["input_ids"])
    special = set(tokenizer.all_special_ids)
    ranked = [token for token, _ in counts.most_common() if token not in special]
    return sorted(special) + ranked[: size - len(special)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="trained adapter folder (save_pretrained output of kangaroo-hf train)")
    parser.add_argument(
        "--draft-vocab", type=int, default=None, help="recompute the draft vocabulary (0: full); default: keep it"
    )
    parser.add_argument("--weights-dtype", choices=WEIGHTS_DTYPES, default="float16")
    parser.add_argument("--threshold", type=float, required=True)
    parser.add_argument("--max-drafts", type=int, required=True)
    parser.add_argument("--lookup", type=int, default=0)
    parser.add_argument("--lookup-max-tokens", type=int, default=0, help="config.lookup_max_tokens (0: fixed length)")
    parser.add_argument("--trust-ngram", type=int, default=0, help="config.lookup_trust_ngram (0: off)")
    parser.add_argument("--data", default="../shared/data/train/*.jsonl")
    parser.add_argument("--answers-per-file", type=int, default=1500)
    parser.add_argument("--metrics", default=None, help="extra JSON of measured metrics to record")
    parser.add_argument("--output", default=str(SHIPPED_ADAPTER), help="where to write (default: the package's)")
    args = parser.parse_args()

    base, tokenizer = load_embedded_base(torch.float32)
    model = KangarooForCausalLM.from_pretrained(args.source, base_model=base)
    if args.draft_vocab is not None:
        vocab = (
            frequent_tokens(tokenizer, args.data, args.draft_vocab, args.answers_per_file)
            if args.draft_vocab
            else None
        )
        model.set_draft_vocab(vocab)
    model.config.draft_threshold = args.threshold
    model.config.max_draft_tokens = args.max_drafts
    model.config.lookup_num_tokens = args.lookup
    model.config.lookup_max_tokens = args.lookup_max_tokens
    model.config.lookup_trust_ngram = args.trust_ngram
    model.config.validate_kangaroo()
    source = Path(args.source)
    metrics = json.loads((source / "kangaroo_metrics.json").read_text())
    if args.metrics:
        metrics = {"training": metrics, "measured": json.loads(Path(args.metrics).read_text())}
    training_args = json.loads((source / "training_args.json").read_text())
    model.save_pretrained(args.output, metrics=metrics, training_args=training_args, weights_dtype=args.weights_dtype)
    print(f"shipped {source} -> {args.output}")


if __name__ == "__main__":
    main()
