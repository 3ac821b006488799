"""Kangaroo behind `pipeline("text-generation")`, streaming tokens to the terminal as they are verified.

python examples/pipeline_streaming.py "Write a haiku about kangaroos."
"""

import argparse

from transformers import TextStreamer, pipeline

from kangaroo_hf import load_default_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt", nargs="?", default="Write a haiku about kangaroos.")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()

    model, tokenizer = load_default_model()
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    # Kangaroo verifies several tokens per step; the streamer prints each accepted chunk as it lands.
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    messages = [{"role": "user", "content": args.prompt}]
    generator(messages, max_new_tokens=args.max_new_tokens, do_sample=False, streamer=streamer)
    print(f"[{model.last_generate_stats.mean_accepted_tokens:.2f} tokens per verification step]")


if __name__ == "__main__":
    main()
