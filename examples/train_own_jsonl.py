"""Train a Kangaroo adapter for your own base on your own chat data (JSONL, one {"messages": [...]} per line).

    python examples/train_own_jsonl.py --base Qwen/Qwen2.5-0.5B-Instruct --data my_chats.jsonl --exit-layer 2

The base stays frozen; only the adapter (one attention block, two RMSNorms) learns, from the base's own next-token
distributions. `--self-distill` first replaces the assistant turns by the base's own greedy answers, which is what
the drafts are checked against. With `--token-targets` the adapter learns those answers' next tokens instead of the
base's whole distribution, so the base only runs up to the exit layer (no full forward per training token): the
cheaper choice on a CPU, and the same top-1 target on self-distilled answers. The result is an adapter-only folder
loadable with `KangarooForCausalLM.from_pretrained(output_dir)`.
"""

import argparse

from transformers import AutoModelForCausalLM, AutoTokenizer

from kangaroo_hf.training import TrainingArguments, train_adapter


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="base model folder or repo id (LLaMA family)")
    parser.add_argument("--data", nargs="+", required=True, help="JSONL files of conversations")
    parser.add_argument("--output-dir", default="runs/my-adapter")
    parser.add_argument("--exit-layer", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--max-examples", type=int, default=None)
    parser.add_argument("--self-distill", action="store_true", help="train on the base's own answers")
    parser.add_argument("--token-targets", action="store_true", help="learn the answers' next tokens (cheaper)")
    args = parser.parse_args(argv)

    base = AutoModelForCausalLM.from_pretrained(args.base)
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        exit_layer=args.exit_layer,
        num_epochs=args.epochs,
        max_examples=args.max_examples,
        self_distill=args.self_distill,
        targets="tokens" if args.token_targets else "distribution",
    )
    result = train_adapter(base, args.data, training_args, tokenizer)
    validation = result.metrics[-1].get("validation", {})
    print(f"adapter saved to {result.output_dir}; validation: {validation}")


if __name__ == "__main__":
    main()
