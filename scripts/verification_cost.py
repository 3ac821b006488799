"""What one forward of the embedded base over N new tokens costs, relative to one token: the price of verifying N - 1
drafts (a chain, or a draft tree of that many nodes) in one step.

    python scripts/verification_cost.py --dtype bfloat16
    python scripts/verification_cost.py --dtype float32 --few-row   # through Kangaroo's float32 CPU kernel

Each size runs after a `--context`-token prefix in the cache (cropped back after each forward), sizes interleaved,
`--repeats` times; the median per size is reported over the median of the first size (1 by default).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from transformers import DynamicCache

from kangaroo_hf import load_embedded_base
from kangaroo_hf.core.kernels import few_row_linear


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--few-row", action="store_true", help="float32 only: products of 1-8 rows via the kernel")
    parser.add_argument("--context", type=int, default=400)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8, 12, 16, 24])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    base, _ = load_embedded_base(getattr(torch, args.dtype))
    generator = torch.Generator().manual_seed(0)
    cache = DynamicCache()
    seconds: dict[int, list[float]] = {size: [] for size in args.sizes}
    kernel = few_row_linear([base]) if args.few_row else contextlib.nullcontext()
    with torch.no_grad(), kernel:
        base(torch.randint(100, 20000, (1, args.context), generator=generator), cache=cache, use_cache=True)
        for repeat in range(args.repeats + 1):  # the first pass warms up
            for size in args.sizes:
                ids = torch.randint(100, 20000, (1, size), generator=generator)
                positions = torch.arange(args.context, args.context + size).unsqueeze(0)
                start = time.perf_counter()
                base(ids, position_ids=positions, cache=cache, use_cache=True)
                elapsed = time.perf_counter() - start
                cache.crop(-size)  # back to the prefix
                if repeat:
                    seconds[size].append(elapsed)
    one = statistics.median(seconds[args.sizes[0]])
    label = f"{args.dtype}{' through the few-row kernel' if args.few_row else ''}"
    print(f"{label}, {args.context}-token context; one token {one * 1000:.1f} ms")
    print("  ".join(f"{size}: {statistics.median(values) / one:.2f}" for size, values in seconds.items()))


if __name__ == "__main__":
    main()
