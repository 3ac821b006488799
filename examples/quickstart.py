"""Quickstart: answer a prompt with the embedded SmolLM2-135M-Instruct and its shipped Kangaroo adapter.

python examples/quickstart.py "What is speculative decoding?" --max-new-tokens 96
"""

import argparse
import time

from kangaroo_hf import load_default_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt", nargs="?", default="Give me three tips for writing clear emails.")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    args = parser.parse_args()

    model, tokenizer = load_default_model()
    messages = [{"role": "user", "content": args.prompt}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")

    start = time.perf_counter()
    output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    seconds = time.perf_counter() - start

    new_tokens = output[0, inputs["input_ids"].shape[1] :]
    print(tokenizer.decode(new_tokens, skip_special_tokens=True))
    stats = model.last_generate_stats
    print(
        f"\n{stats.new_tokens} tokens in {seconds:.2f} s; {stats.mean_accepted_tokens:.2f} tokens per "
        f"verification step ({stats.accepted_drafts}/{stats.drafted_tokens} drafts accepted)"
    )


if __name__ == "__main__":
    main()
