"""What exporting the drafter with the full LM head changes: the shipped adapter drafts over a reduced vocabulary
(`draft_vocab_size`), the exported drafter (`kangaroo-hf export`) scores every token.

For each dev question the base answers greedily (made with Kangaroo, lossless in float32); then, teacher-forced
along prompt and answer, the drafter's top token is taken over the reduced vocabulary (as Kangaroo drafts) and over
the full one (as the exported drafter does), and each is compared with the base's next token on the answer's
positions. The match rate is the acceptance rate of a first draft; the script prints both, and how often the two
choices differ.

    python scripts/draft_vocab_agreement.py --limit-per-category 4 --max-new-tokens 128 --output docs/...json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm import tqdm

from kangaroo_hf import load_default_model
from kangaroo_hf.bench.runner import find_questions_file, load_questions
from kangaroo_hf.loading import chat_input_ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit-per-category", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--output", type=Path, default=None, help="JSON file for the counts")
    args = parser.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    model, tokenizer = load_default_model()
    base, vocab = model.get_base_model(), model.adapter.draft_vocab_ids
    questions = load_questions(find_questions_file(), args.limit_per_category)
    counts = {"positions": 0, "reduced_matches": 0, "full_matches": 0, "choices_differ": 0}
    by_category: dict[str, dict[str, int]] = {}
    for question in tqdm(questions, desc="questions", unit="question"):
        input_ids = chat_input_ids(tokenizer, question.turns[0])
        with torch.no_grad():
            # Kangaroo's float32 greedy output is the base's own, token for token (and twice as fast to make)
            sequence = model.generate(input_ids, do_sample=False, max_new_tokens=args.max_new_tokens)
            positions = torch.arange(sequence.shape[1]).unsqueeze(0)
            hidden = model.adapter_forward(model.shallow_forward(sequence, positions, None), positions, None)
            logits = model.lm_head_logits(hidden)[0, input_ids.shape[1] - 1 : -1]  # predicting the answer
        targets = sequence[0, input_ids.shape[1] :]
        full = logits.argmax(-1)
        reduced = vocab[logits[:, vocab].argmax(-1)] if vocab.numel() else full
        row = by_category.setdefault(question.category, dict.fromkeys(counts, 0))
        for tally in (counts, row):
            tally["positions"] += targets.numel()
            tally["reduced_matches"] += int((reduced == targets).sum())
            tally["full_matches"] += int((full == targets).sum())
            tally["choices_differ"] += int((reduced != full).sum())
    print(f"draft vocabulary: {vocab.numel()} of {base.config.vocab_size} tokens")
    print("| category | positions | reduced vocabulary | full vocabulary | choices differ |")
    print("|---|---:|---:|---:|---:|")
    for name, tally in [*by_category.items(), ("**overall**", counts)]:
        n = tally["positions"]
        print(
            f"| {name} | {n} | {tally['reduced_matches'] / n:.1%} | {tally['full_matches'] / n:.1%} | "
            f"{tally['choices_differ'] / n:.2%} |"
        )
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({"overall": counts, "by_category": by_category}, indent=2) + "\n")


if __name__ == "__main__":
    main()
